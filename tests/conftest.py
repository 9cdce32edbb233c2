"""Shared fixtures: tiny seeded checkpoints written once per session, and parity helpers."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from checkpoint.args import ModelArgs
from checkpoint.spec import tensor_spec
from checkpoint.tiny import write_tiny_checkpoint
from model_jax.loading import stacked_names

jax.config.update("jax_numpy_dtype_promotion", "strict")

# Small enough that every config runs in well under a second on two CPU cores.
BASE = ModelArgs(
    dim=64,
    n_layers=2,
    head_dim=16,
    hidden_dim=128,
    n_heads=4,
    n_kv_heads=2,
    norm_eps=1e-5,
    vocab_size=512,
    sliding_window=None,
    rope_theta=10000.0,
)


def zeros_getter(args: ModelArgs, dtype=jnp.float32):
    """A model getter (see model_jax.loading) returning zeros of the spec's shapes."""
    spec = tensor_spec(args)

    def get(name):
        names = stacked_names(name, args)
        return jnp.zeros((*names.shape, *spec[names.flat[0]]), dtype)

    return get


def tiny_args(**changes) -> ModelArgs:
    return dataclasses.replace(BASE, **changes)


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


def relative_error(actual, expected) -> float:
    """max |actual − expected| / max |expected|: error relative to the tensor's scale."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def relative_l2(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def random_tokens(n: int, vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=n, dtype=np.int32)
