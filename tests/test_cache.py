"""Sliding-window semantics, rolling-buffer cached decode and chunked prefill, in both models."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from support import random_tokens, relative_error, tiny_args

import reference_torch
from model_jax import KVCache, load_model
from model_jax.model import attention_mask as jax_mask
from reference_torch.model import attention_mask as torch_mask

W = 8
WINDOWED = tiny_args(sliding_window=W)
# Ministral-style: full attention, then three windowed layers (and a second, wider window).
PATTERN = tiny_args(n_layers=4, sliding_window=[None, W, W, 2 * W])
CONFIGS = {"window": WINDOWED, "no-window": tiny_args(sliding_window=None), "per-layer": PATTERN}
SEQ = 30  # > 3·W: the rolling buffer wraps several times


class TorchRunner:
    """Full, cached and chunked forwards of the torch reference (fp32), as numpy."""

    def __init__(self, folder):
        self.model = reference_torch.Transformer.from_folder(folder, dtype=torch.float32)

    def full(self, tokens):
        return self.model(torch.from_numpy(tokens).long()[None])[0].numpy()

    def chunked(self, tokens, chunk_sizes):
        cache = reference_torch.RollingKVCache(self.model.args, 1, len(tokens), dtype=torch.float32)
        out, start = [], 0
        for size in chunk_sizes:
            chunk = torch.from_numpy(tokens[start : start + size]).long()[None]
            out.append(self.model(chunk, cache)[0].numpy())
            start += size
        return np.concatenate(out)


class JaxRunner:
    def __init__(self, folder):
        self.model = load_model(folder, dtype=jnp.float32)

    def full(self, tokens):
        return np.asarray(self.model(jnp.asarray(tokens)))

    def chunked(self, tokens, chunk_sizes):
        cache = KVCache.empty(self.model.args, len(tokens), dtype=jnp.float32)
        out, start = [], 0
        for size in chunk_sizes:
            positions = jnp.arange(start, start + size)
            logits, cache = self.model.step(
                jnp.asarray(tokens[start : start + size]), positions, cache
            )
            out.append(np.asarray(logits))
            start += size
        return np.concatenate(out)


RUNNERS = {"torch": TorchRunner, "jax": JaxRunner}


MASKS = {
    "torch": lambda q, k: torch_mask(torch.arange(q), torch.arange(k), W).numpy(),
    "jax": lambda q, k: np.asarray(jax_mask(jnp.arange(q), jnp.arange(k), W)),
}


@pytest.mark.parametrize("impl", MASKS)
def test_mask_sees_w_keys_including_the_query(impl):
    visible = MASKS[impl](20, 20)
    assert visible[15].nonzero()[0].tolist() == list(range(15 - W + 1, 16))


@pytest.mark.slow
@pytest.mark.parametrize("runner", RUNNERS)
def test_key_exactly_w_back_is_not_attended_and_w_minus_1_back_is(make_checkpoint, runner):
    # One block: logits at p depend on the tokens the block attends to, and on nothing else.
    run = RUNNERS[runner](make_checkpoint(tiny_args(n_layers=1, sliding_window=W)))
    tokens, p = random_tokens(SEQ, WINDOWED.vocab_size), 20
    base = run.full(tokens)[p]
    for back, changes in [(W, False), (W - 1, True)]:
        edited = tokens.copy()
        edited[p - back] = (edited[p - back] + 1) % WINDOWED.vocab_size
        delta = relative_error(run.full(edited)[p], base)
        assert (delta > 1e-3) if changes else (delta < 1e-6), (back, delta)


@pytest.mark.slow
@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize("config", CONFIGS)
def test_cached_decode_equals_full_forward(make_checkpoint, runner, config):
    args = CONFIGS[config]
    run = RUNNERS[runner](make_checkpoint(args))
    tokens = random_tokens(SEQ, args.vocab_size)
    decoded = run.chunked(tokens, [5] + [1] * (SEQ - 5))  # prefill 5, then one token a step
    assert relative_error(decoded, run.full(tokens)) <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize(
    "chunks",
    [[7, 7, 7, 7, 2], [W] * 3 + [6], [20, 10]],
    ids=["shorter-than-window", "window", "longer-than-window"],
)
def test_chunked_prefill_equals_unchunked(make_checkpoint, runner, chunks):
    run = RUNNERS[runner](make_checkpoint(WINDOWED))
    tokens = random_tokens(SEQ, WINDOWED.vocab_size, seed=3)
    assert relative_error(run.chunked(tokens, chunks), run.full(tokens)) <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("runner", RUNNERS)
def test_chunked_prefill_with_per_layer_windows_equals_unchunked(make_checkpoint, runner):
    run = RUNNERS[runner](make_checkpoint(PATTERN))
    tokens = random_tokens(SEQ, PATTERN.vocab_size, seed=4)
    for chunks in ([7, 7, 7, 7, 2], [20, 10]):
        assert relative_error(run.chunked(tokens, chunks), run.full(tokens)) <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS)
def test_cached_decode_agrees_across_models(make_checkpoint, config):
    args = CONFIGS[config]
    folder, tokens = make_checkpoint(args), random_tokens(SEQ, args.vocab_size, seed=5)
    chunks = [11, 4] + [1] * (SEQ - 15)
    ref = TorchRunner(folder).chunked(tokens, chunks)
    assert relative_error(JaxRunner(folder).chunked(tokens, chunks), ref) <= 1e-5


@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize("layer", range(4))
def test_each_layer_sees_exactly_its_own_window(make_checkpoint, runner, layer):
    """One block with the window PATTERN gives layer `layer`: a key `window` back is unseen,
    one `window - 1` back is seen (full attention: both are)."""
    window = PATTERN.layer_windows[layer]
    args = tiny_args(n_layers=1, sliding_window=window)
    run = RUNNERS[runner](make_checkpoint(args))
    tokens, p = random_tokens(SEQ, args.vocab_size), 20
    base = run.full(tokens)[p]
    for back in (window or W, (window or W) - 1):
        edited = tokens.copy()
        edited[p - back] = (edited[p - back] + 1) % args.vocab_size
        changed = relative_error(run.full(edited)[p], base) > 1e-3
        assert changed == (window is None or back < window), (window, back)


def test_caches_hold_w_slots_for_windowed_layers_and_full_length_for_the_others():
    capacity = 100
    cache = KVCache.empty(PATTERN, capacity=capacity)
    assert cache.slots == (capacity, W, W, 2 * W)
    assert [k.shape[0] for k in cache.k] == [1, 1, 1, 1]  # one group of the 4-layer period
    ref = reference_torch.RollingKVCache(PATTERN, 1, capacity, dtype=torch.float32)
    assert [k.shape[1] for k in ref.k] == [capacity, W, W, 2 * W]


def test_jax_cache_holds_only_w_slots(make_checkpoint):
    cache = KVCache.empty(WINDOWED, capacity=10_000)
    assert cache.slots == (W,) and cache.k[0].shape == (WINDOWED.n_layers, W, 2, 16)
