"""Generation: JAX == torch reference (greedy, fp32) past the window, ragged batches, chunking,
EOS, seeded sampling, and the exact token sets top-k / top-p keep."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from support import random_tokens, tiny_args

import model_jax
import reference_torch
from model_jax.generate import bucket
from model_jax.sampling import choose_tokens, keep_mask

W = 8
ARGS = tiny_args(sliding_window=W, n_layers=2)
NEW = 3 * W  # generation crosses the window boundary several times


@pytest.fixture(scope="module")
def models(make_checkpoint):
    folder = make_checkpoint(ARGS, seed=7)
    return (
        model_jax.load_model(folder, dtype=jnp.float32),
        reference_torch.Transformer.from_folder(folder, dtype=torch.float32),
    )


def ragged_prompts():
    """Lengths 1, 5, and 3·W + 3 (longer than the window, not a multiple of the chunk)."""
    return [random_tokens(n, ARGS.vocab_size, seed=n).tolist() for n in (1, 5, 3 * W + 3)]


@pytest.mark.slow
def test_greedy_matches_torch_reference_token_for_token(models):
    port, ref = models
    prompts = ragged_prompts()
    ours, our_logprobs = model_jax.generate(port, prompts, max_new_tokens=NEW, return_logprobs=True)
    theirs, their_logprobs = reference_torch.generate(ref, prompts, max_new_tokens=NEW)
    assert ours == theirs
    assert all(len(t) == NEW for t in ours)
    np.testing.assert_allclose(
        np.concatenate(our_logprobs), np.concatenate(their_logprobs), atol=1e-4
    )


@pytest.mark.slow
def test_first_token_is_the_argmax_at_the_last_prompt_position(models):
    port, _ = models
    prompt = ragged_prompts()[2]
    full = np.asarray(port(jnp.asarray(prompt)))
    first = model_jax.generate(port, [prompt], max_new_tokens=1)[0][0]
    assert first == int(full[-1].argmax())


@pytest.mark.slow
def test_greedy_continuation_equals_full_recompute(models):
    port, _ = models
    prompt = ragged_prompts()[1]
    generated = model_jax.generate(port, [prompt], max_new_tokens=NEW)[0]
    sequence = prompt + generated
    full = np.asarray(port(jnp.asarray(sequence)))
    assert generated == full[len(prompt) - 1 : -1].argmax(-1).tolist()


@pytest.mark.slow
@pytest.mark.parametrize("chunk_size", [3, W, 2 * W + 1])
def test_chunked_prefill_gives_the_same_generation(models, chunk_size):
    port, _ = models
    prompts = ragged_prompts()
    unchunked = model_jax.generate(port, prompts, max_new_tokens=6, chunk_size=64)
    assert model_jax.generate(port, prompts, max_new_tokens=6, chunk_size=chunk_size) == unchunked


def test_batch_equals_one_by_one(models):
    port, _ = models
    prompts = ragged_prompts()
    batched = model_jax.generate(port, prompts, max_new_tokens=10)
    assert batched == [model_jax.generate(port, [p], max_new_tokens=10)[0] for p in prompts]


def test_eos_stops_one_sequence_without_stopping_the_others(models):
    port, _ = models
    prompts = ragged_prompts()
    free = model_jax.generate(port, prompts, max_new_tokens=10)
    eos = free[0][3]  # make the 4th token of the first sequence its EOS
    stopped = model_jax.generate(port, prompts, max_new_tokens=10, eos_id=eos)
    assert stopped[0] == free[0][: free[0].index(eos) + 1]
    for before, after in zip(free[1:], stopped[1:], strict=True):
        assert after == (before[: before.index(eos) + 1] if eos in before else before)


def test_seeded_sampling_is_reproducible_and_seed_dependent(models):
    port, _ = models
    prompts = ragged_prompts()

    def sample(seed):
        return model_jax.generate(
            port, prompts, max_new_tokens=12, temperature=1.0, top_p=0.9, key=jax.random.key(seed)
        )

    assert sample(0) == sample(0)
    assert sample(0) != sample(1)


def test_prompt_longer_than_the_window_and_many_windows_of_decode(models):
    port, ref = models
    prompt = random_tokens(10 * W + 1, ARGS.vocab_size, seed=99).tolist()
    ours = model_jax.generate(port, [prompt], max_new_tokens=5 * W)
    theirs, _ = reference_torch.generate(ref, [prompt], max_new_tokens=5 * W)
    assert ours == theirs


@pytest.mark.slow
def test_compiles_once_per_batch_size_and_length_bucket(models, caplog):
    port, _ = models
    model_jax.generate(port, [[1, 2, 3]], max_new_tokens=2)  # warm the 16-token bucket
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        for n in (2, 5, 9, 13):
            model_jax.generate(port, [list(range(1, n + 1))], max_new_tokens=2)
        assert not [r for r in caplog.records if "Compiling" in r.getMessage()]
        model_jax.generate(port, [[1]] * 5, max_new_tokens=2)  # a new batch size compiles
        assert [r for r in caplog.records if "Compiling" in r.getMessage()]
    assert bucket(5) == bucket(13) == 16 and bucket(17) == 32


# Sampling filters on hand-made distributions.


def logits_of(probs):
    return jnp.log(jnp.asarray(probs, jnp.float32))


def test_top_k_keeps_exactly_k_tokens_ties_by_id():
    logits = jnp.asarray([1.0, 3.0, 2.0, 3.0, 0.0])
    keep = keep_mask(logits, 1.0, 1.0, top_k=2)
    assert np.asarray(keep).nonzero()[0].tolist() == [1, 3]
    keep = keep_mask(logits, 1.0, 1.0, top_k=3)
    assert np.asarray(keep).nonzero()[0].tolist() == [1, 2, 3]


@pytest.mark.parametrize(
    ("top_p", "kept"),
    [(0.45, [0]), (0.55, [0, 1]), (0.75, [0, 1]), (0.85, [0, 1, 2]), (1.0, [0, 1, 2, 3])],
)
def test_top_p_keeps_the_smallest_set_whose_mass_exceeds_p(top_p, kept):
    keep = keep_mask(logits_of([0.5, 0.3, 0.15, 0.05]), 1.0, top_p, 0)
    assert np.asarray(keep).nonzero()[0].tolist() == kept


def test_top_p_applies_after_temperature():
    # T = 0.5 sharpens [0.5, 0.3, 0.15, 0.05] to ≈ [0.69, 0.25, 0.06, 0.01]: 0.6 keeps one.
    keep = keep_mask(logits_of([0.5, 0.3, 0.15, 0.05]), 0.5, 0.6, 0)
    assert np.asarray(keep).nonzero()[0].tolist() == [0]


@pytest.mark.slow
def test_sampling_never_leaves_the_kept_set_and_greedy_is_argmax():
    logits = jnp.tile(logits_of([0.4, 0.3, 0.2, 0.1]), (4000, 1))
    tokens, _ = choose_tokens(logits, jax.random.key(0), temperature=1.0, top_p=1.0, top_k=2)
    counts = np.bincount(np.asarray(tokens), minlength=4)
    assert counts[2:].sum() == 0
    assert abs(counts[0] / 4000 - 0.4 / 0.7) < 0.03  # renormalised over the kept pair
    greedy, logprobs = choose_tokens(logits[:2], None, temperature=0.0, top_p=1.0, top_k=0)
    assert greedy.tolist() == [0, 0]
    np.testing.assert_allclose(np.asarray(logprobs), np.log(0.4), rtol=1e-6)


@pytest.mark.slow
def test_greedy_with_per_layer_windows_matches_the_reference(make_checkpoint):
    """Ministral-style windows (full, W, W, 2W): generation crosses every window boundary."""
    args = tiny_args(n_layers=4, sliding_window=[None, W, W, 2 * W])
    folder = make_checkpoint(args, seed=5)
    port = model_jax.load_model(folder, dtype=jnp.float32)
    ref = reference_torch.Transformer.from_folder(folder, dtype=torch.float32)
    prompts = [random_tokens(n, args.vocab_size, seed=n).tolist() for n in (3, 2 * W + 5)]
    ours = model_jax.generate(port, prompts, max_new_tokens=3 * W)
    assert ours == reference_torch.generate(ref, prompts, max_new_tokens=3 * W)[0]
