"""Batched generation with the rolling-buffer cache — the JAX counterpart of mistral-inference
`generate.py`, with the bugs such ports have had fixed and tested (docs/generation.md).

Prompts of different lengths are prefilled together in chunks (default: the sliding window)
into per-sequence caches; padding has position -1 and is never written to the cache. The chunk
length and the cache capacity are rounded up to powers of two, so programs are compiled once per
(batch size, length bucket), not once per prompt length. The first generated token sits at
position L (the prompt length); decoding stops per sequence at `eos_id`. On a mesh, the batch is
split over its "data" axis (data parallel) and the weights over "model" (tensor parallel).
"""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, Float, Int, PRNGKeyArray

from checkpoint.args import ModelArgs
from model_jax.cache import KVCache
from model_jax.model import Transformer, run_layers
from model_jax.sampling import choose_tokens

MIN_BUCKET = 16
DEFAULT_CHUNK = 2048  # for models without a sliding window
EARLY_STOP_EVERY = 8  # steps between host checks for "every sequence hit EOS"


def bucket(n: int, minimum: int = MIN_BUCKET) -> int:
    """The smallest power of two ≥ n (at least `minimum`)."""
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def check_positions(args: ModelArgs, prompt_tokens: int, max_new_tokens: int) -> None:
    """Refuse a prompt whose continuation would pass `max_position_embeddings` (the length
    YaRN and the Llama-4 scaling were trained to)."""
    limit = args.max_position_embeddings
    if limit is not None and prompt_tokens + max_new_tokens > limit:
        raise ValueError(
            f"{prompt_tokens} prompt tokens and {max_new_tokens} new tokens reach position "
            f"{prompt_tokens + max_new_tokens - 1}, past max_position_embeddings {limit}"
        )


def generate(
    model: Transformer,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    key: PRNGKeyArray | None = None,
    chunk_size: int | None = None,
    eos_id: int | None = None,
    return_logprobs: bool = False,
    on_step=None,
):
    """Generate up to `max_new_tokens` ids after each prompt (prompt excluded).

    Returns one list of ids per prompt (ending with `eos_id` where it was produced), and with
    `return_logprobs` also the model's log-probability of each chosen id. `temperature=0` is
    greedy. `on_step(step, tokens)` is called with each step's ids (forces a sync per step).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (the BOS)")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0 or max_new_tokens < 1:
        raise ValueError("need temperature ≥ 0, 0 < top_p ≤ 1, top_k ≥ 0, max_new_tokens ≥ 1")
    if temperature > 0 and key is None:
        raise ValueError("sampling (temperature > 0) needs a PRNG key")
    args = model.args
    lengths = np.array([len(p) for p in prompts])
    longest = int(lengths.max())
    check_positions(args, longest, max_new_tokens)
    chunk = min(chunk_size or args.shortest_window or DEFAULT_CHUNK, bucket(longest))
    capacity = bucket(longest + max_new_tokens)
    batch = len(prompts)
    put = _batch_placement(model, batch)
    cache = put(jax.vmap(lambda _: KVCache.empty(args, capacity, model.dtype))(jnp.arange(batch)))

    logits = put(jnp.zeros((batch, args.vocab_size), jnp.float32))
    for start in range(0, longest, chunk):
        tokens, positions = _chunk_arrays(prompts, start, chunk)
        last = np.where(
            (lengths - 1 >= start) & (lengths - 1 < start + chunk), lengths - 1 - start, -1
        )
        cache, logits = _prefill(
            model, put(tokens), put(positions), cache, put(last.astype(np.int32)), logits
        )

    choose = functools.partial(_choose, temperature=temperature, top_p=top_p, top_k=top_k)
    positions = put(lengths.astype(np.int32))
    done = jnp.zeros(batch, bool)
    out_tokens, out_logprobs, out_live = [], [], []
    for step in range(max_new_tokens):
        step_key = None if key is None else jax.random.fold_in(key, step)
        tokens, logprobs = choose(logits, step_key)
        out_tokens.append(tokens)
        out_logprobs.append(logprobs)
        out_live.append(~done)
        if eos_id is not None:
            done = done | (tokens == eos_id)
        if on_step is not None:
            on_step(
                step,
                [
                    int(t) if live else None
                    for t, live in zip(np.asarray(tokens), np.asarray(out_live[-1]), strict=True)
                ],
            )
        if step + 1 == max_new_tokens or (
            eos_id is not None and step % EARLY_STOP_EVERY == 0 and bool(done.all())
        ):
            break
        logits, cache = _decode(model, tokens, positions + step, cache)

    tokens, logprobs, live = (np.stack(x, axis=1) for x in (out_tokens, out_logprobs, out_live))
    result = [tokens[i][live[i]].tolist() for i in range(batch)]
    if return_logprobs:
        return result, [logprobs[i][live[i]].tolist() for i in range(batch)]
    return result


def _batch_placement(model: Transformer, batch: int):
    """Where batch-leading arrays go: split over the mesh's "data" axis when the weights live
    on a mesh whose data axis divides the batch, else the default device."""
    mesh = getattr(getattr(model.norm.weight, "sharding", None), "mesh", None)
    data = dict(mesh.shape).get("data", 1) if isinstance(mesh, Mesh) else 1
    if data == 1 or batch % data:
        return jax.device_put
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    return lambda tree: jax.device_put(tree, sharding)


def _chunk_arrays(prompts: list[list[int]], start: int, chunk: int):
    tokens = np.zeros((len(prompts), chunk), np.int32)
    positions = np.full((len(prompts), chunk), -1, np.int32)
    for i, prompt in enumerate(prompts):
        piece = prompt[start : start + chunk]
        tokens[i, : len(piece)] = piece
        positions[i, : len(piece)] = np.arange(start, start + len(piece))
    return tokens, positions


@eqx.filter_jit
def _prefill(
    model: Transformer,
    tokens: Int[Array, "batch chunk"],
    positions: Int[Array, "batch chunk"],
    cache: KVCache,
    last: Int[Array, " batch"],
    logits: Float[Array, "batch vocab"],
) -> tuple[KVCache, Float[Array, "batch vocab"]]:
    """Prefill one chunk per sequence; keep the logits of each prompt's last token."""

    def one(tokens, positions, cache, last, previous):
        h, _, cache = run_layers(model, tokens, positions, cache, collect_hidden=False)
        current = model.head(h[jnp.maximum(last, 0)][None])[1][0]
        return cache, jnp.where(last >= 0, current, previous)

    return jax.vmap(one)(tokens, positions, cache, last, logits)


@eqx.filter_jit
def _decode(
    model: Transformer,
    tokens: Int[Array, " batch"],
    positions: Int[Array, " batch"],
    cache: KVCache,
) -> tuple[Float[Array, "batch vocab"], KVCache]:
    """One decode step for every sequence."""

    def one(token, position, cache):
        h, _, cache = run_layers(model, token[None], position[None], cache, collect_hidden=False)
        return model.head(h)[1][0], cache

    return jax.vmap(one)(tokens, positions, cache)


@functools.partial(jax.jit, static_argnames=("temperature", "top_p", "top_k"))
def _choose(logits, key, *, temperature, top_p, top_k):
    return choose_tokens(logits, key, temperature=temperature, top_p=top_p, top_k=top_k)
