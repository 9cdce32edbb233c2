"""The compiled program does not grow with depth: blocks are stacked and scanned."""

import functools

import jax
import jax.numpy as jnp
from conftest import tiny_args, zeros_getter

from model_jax import KVCache
from model_jax.model import Transformer, run_layers


def zeros_model(args) -> Transformer:
    return Transformer.load(args, zeros_getter(args))


def program_size(n_layers: int, with_cache: bool) -> int:
    args = tiny_args(n_layers=n_layers, sliding_window=8)
    model, tokens = zeros_model(args), jnp.zeros(5, jnp.int32)
    cache = KVCache.empty(args, 32, jnp.float32) if with_cache else None
    forward = functools.partial(run_layers, collect_hidden=True)
    jaxpr = jax.make_jaxpr(forward)(model, tokens, jnp.arange(5), cache)
    return len(str(jaxpr).splitlines())


def test_forward_program_size_is_independent_of_depth():
    assert program_size(2, with_cache=False) == program_size(16, with_cache=False)


def test_cached_step_program_size_is_independent_of_depth():
    assert program_size(2, with_cache=True) == program_size(16, with_cache=True)
