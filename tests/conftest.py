"""Fixtures: tiny seeded checkpoints written once per session, code patched for a test;
strict JAX dtype promotion."""

import jax
import pytest
from support import BASE

from checkpoint.args import ModelArgs
from checkpoint.tiny import write_tiny_checkpoint
from verify import runners

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


@pytest.fixture
def patched(monkeypatch):
    """monkeypatch.setattr, with every compiled program dropped before and after (programs
    traced before a patch would run the old code)."""

    def clear():
        jax.clear_caches()
        runners._compiled.cache_clear()

    def patch(target, name, value):
        monkeypatch.setattr(target, name, value)
        clear()

    yield patch
    monkeypatch.undo()
    clear()
