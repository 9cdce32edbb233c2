"""The compiled program does not grow with depth: blocks are stacked and scanned."""

import functools

import jax
import jax.numpy as jnp
from support import tiny_args

from model_jax import KVCache
from model_jax.model import Transformer, run_layers


def zeros_model(args) -> Transformer:
    return Transformer.zeros(args, jnp.float32)


def equations(jaxpr) -> int:
    """Equations in a jaxpr, counting those of every nested jaxpr (scan bodies, …)."""
    count = 0
    for eqn in jaxpr.eqns:
        count += 1
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            if hasattr(inner, "eqns"):
                count += equations(inner)
    return count


def program_size(n_layers: int, with_cache: bool, window=8) -> int:
    args = tiny_args(n_layers=n_layers, sliding_window=window)
    model, tokens = zeros_model(args), jnp.zeros(5, jnp.int32)
    cache = KVCache.empty(args, 32, jnp.float32) if with_cache else None
    forward = functools.partial(run_layers, collect_hidden=True)
    return equations(jax.make_jaxpr(forward)(model, tokens, jnp.arange(5), cache).jaxpr)


def test_forward_program_size_is_independent_of_depth():
    assert program_size(2, with_cache=False) == program_size(16, with_cache=False)


def test_cached_step_program_size_is_independent_of_depth():
    assert program_size(2, with_cache=True) == program_size(16, with_cache=True)


def test_a_window_pattern_costs_one_period_whatever_the_depth():
    """Ministral-style [full, W, W, W] repeats: the scan body holds one period."""
    pattern = [None, 8, 8, 8]
    for with_cache in (False, True):
        four, sixteen = (program_size(n, with_cache, pattern) for n in (4, 16))
        assert four == sixteen > program_size(4, with_cache)
