"""Fixtures: tiny seeded checkpoints written once per session; strict JAX dtype promotion."""

import jax
import pytest
from support import BASE

from checkpoint.args import ModelArgs
from checkpoint.tiny import write_tiny_checkpoint

jax.config.update("jax_numpy_dtype_promotion", "strict")


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory):
    """Write (once per distinct request) a tiny official-format folder and return its path."""
    made = {}

    def make(args: ModelArgs = BASE, **kwargs):
        key = (args, tuple(sorted(kwargs.items())))
        if key not in made:
            folder = tmp_path_factory.mktemp("ckpt")
            real = args.vocab_size in (32000, 32768, 131072)  # mistral-common ships these
            kwargs.setdefault("tokenizer", None if real else False)
            made[key] = write_tiny_checkpoint(folder, args, **kwargs)
        return made[key]

    return make
