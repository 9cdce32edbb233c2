"""The Mistral transformer in Equinox — mirrors `reference_torch/model.py` class for class,
with the same parameter names, so the checkpoint key map is the identity. How every parameter
lies on a mesh, and which fields stack their leaves, is declared on the fields
(`model_jax.structure`).

The blocks are stored stacked (every leaf of `Transformer.layers` has a leading `layers` axis)
and run with `lax.scan` over groups of one window-pattern period, so the compiled program does
not grow with depth; each layer attends over its own window (params.json may give a list).
Numerics follow the reference op for op: fp32 RMSNorm / RoPE / softmax / SiLU, bf16 products
rounded where torch rounds them, fp32 logits.
"""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Bool, Float, Int

from checkpoint.args import ModelArgs
from model_jax.cache import KVCache, write_slots
from model_jax.moe import MoeFeedForward
from model_jax.rope import apply_rotary, rotary_angles
from model_jax.structure import sharded, stacked

HIGHEST = lax.Precision.HIGHEST  # fp32 matmuls stay fp32 on GPU/TPU (no TF32)


class Linear(eqx.Module):
    weight: Float[Array, "*stack out in"]  # torch layout; leading axes when stacked

    def __call__(self, x: Float[Array, "seq in"]) -> Float[Array, "seq out"]:
        return jnp.matmul(x, self.weight.T, precision=HIGHEST)

    @classmethod
    def zeros(cls, out: int, in_: int, dtype) -> "Linear":
        return cls(jnp.zeros((out, in_), dtype))


class Embedding(eqx.Module):
    weight: Float[Array, "vocab dim"]

    def __call__(self, tokens: Int[Array, " seq"]) -> Float[Array, "seq dim"]:
        return self.weight[tokens]


class RMSNorm(eqx.Module):
    weight: Float[Array, "*stack dim"]
    eps: float = eqx.field(static=True)

    def __call__(self, x: Float[Array, "seq dim"]) -> Float[Array, "seq dim"]:
        xf = x.astype(jnp.float32)
        normed = xf * lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return normed.astype(x.dtype) * self.weight

    @classmethod
    def zeros(cls, args: ModelArgs, dtype) -> "RMSNorm":
        return cls(jnp.zeros((args.dim,), dtype), args.norm_eps)


def attention_mask(
    q_pos: Int[Array, " q"], k_pos: Int[Array, " k"], window: int | None
) -> Bool[Array, "q k"]:
    """Key visible iff it is filled, causal, and fewer than W positions back."""
    q, k = q_pos[:, None], k_pos[None, :]
    visible = (k >= 0) & (k <= q)
    if window is not None:
        visible &= q - k < window
    return visible


class Attention(eqx.Module):
    wq: Linear = sharded("model", None)  # rows: heads
    wk: Linear = sharded("model", None)
    wv: Linear = sharded("model", None)
    wo: Linear = sharded(None, "model")  # columns: heads
    n_heads: int = eqx.field(static=True)
    n_kv_heads: int = eqx.field(static=True)
    head_dim: int = eqx.field(static=True)
    sliding_window: int | None = eqx.field(static=True)

    def __call__(
        self,
        x: Float[Array, "seq dim"],
        cos: Float[Array, "seq half"],
        sin: Float[Array, "seq half"],
        positions: Int[Array, " seq"],
        cached: tuple[Array, Array, Array] | None = None,
    ) -> tuple[
        Float[Array, "seq dim"],
        Float[Array, "seq kv_heads head_dim"],
        Float[Array, "seq kv_heads head_dim"],
    ]:
        """Output, and this chunk's rotated keys and values (for the cache)."""
        T, rep = x.shape[0], self.n_heads // self.n_kv_heads
        xq = apply_rotary(self.wq(x).reshape(T, self.n_heads, self.head_dim), cos, sin)
        xk = apply_rotary(self.wk(x).reshape(T, self.n_kv_heads, self.head_dim), cos, sin)
        xv = self.wv(x).reshape(T, self.n_kv_heads, self.head_dim)

        keys, values, key_pos = xk, xv, positions
        if cached is not None:
            cache_k, cache_v, cache_pos = cached
            keys = jnp.concatenate([cache_k, xk])
            values = jnp.concatenate([cache_v, xv])
            key_pos = jnp.concatenate([cache_pos, positions])

        # Query head h reads kv head h // rep, as the reference's repeat_interleave.
        q = xq.reshape(T, self.n_kv_heads, rep, self.head_dim)
        scores = jnp.einsum("tgrd,sgd->grts", q, keys, precision=HIGHEST)
        # The reference multiplies bf16 scores by a Python float: fp32 product, one rounding.
        scores = (scores.astype(jnp.float32) * self.head_dim**-0.5).astype(x.dtype)
        visible = attention_mask(positions, key_pos, self.sliding_window)
        scores = jnp.where(visible, scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
        out = jnp.einsum("grts,sgd->tgrd", probs, values, precision=HIGHEST)
        return self.wo(out.reshape(T, -1)), xk, xv

    @classmethod
    def zeros(cls, args: ModelArgs, window: int | None, dtype) -> "Attention":
        q, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
        return cls(
            Linear.zeros(q, args.dim, dtype),
            Linear.zeros(kv, args.dim, dtype),
            Linear.zeros(kv, args.dim, dtype),
            Linear.zeros(args.dim, q, dtype),
            args.n_heads,
            args.n_kv_heads,
            args.head_dim,
            window,
        )


class FeedForward(eqx.Module):
    w1: Linear = sharded("model", None)  # rows: hidden_dim
    w2: Linear = sharded(None, "model")  # columns: hidden_dim
    w3: Linear = sharded("model", None)

    def __call__(self, x: Float[Array, "seq dim"]) -> Float[Array, "seq dim"]:
        gate = jax.nn.silu(self.w1(x).astype(jnp.float32)).astype(x.dtype)
        return self.w2(gate * self.w3(x))

    @classmethod
    def zeros(cls, args: ModelArgs, dtype) -> "FeedForward":
        return cls(
            Linear.zeros(args.hidden_dim, args.dim, dtype),
            Linear.zeros(args.dim, args.hidden_dim, dtype),
            Linear.zeros(args.hidden_dim, args.dim, dtype),
        )


class TransformerBlock(eqx.Module):
    attention: Attention
    feed_forward: FeedForward | MoeFeedForward
    attention_norm: RMSNorm = sharded(None)
    ffn_norm: RMSNorm = sharded(None)

    def __call__(
        self,
        x: Float[Array, "seq dim"],
        cos: Float[Array, "seq half"],
        sin: Float[Array, "seq half"],
        positions: Int[Array, " seq"],
        cached: tuple[Array, Array, Array] | None = None,
    ) -> tuple[
        Float[Array, "seq dim"],
        Float[Array, "seq kv_heads head_dim"],
        Float[Array, "seq kv_heads head_dim"],
    ]:
        """(seq, dim) → (seq, dim), plus the chunk's keys and values for the cache."""
        attn, xk, xv = self.attention(self.attention_norm(x), cos, sin, positions, cached)
        h = x + attn
        return h + self.feed_forward(self.ffn_norm(h)), xk, xv

    def with_window(self, window: int | None) -> "TransformerBlock":
        """The same block attending over `window` keys (None: all)."""
        attention = dataclasses.replace(self.attention, sliding_window=window)
        return eqx.tree_at(lambda b: b.attention, self, attention)

    @classmethod
    def zeros(cls, args: ModelArgs, window: int | None, dtype) -> "TransformerBlock":
        if args.moe is None:
            feed_forward = FeedForward.zeros(args, dtype)
        else:
            feed_forward = MoeFeedForward.zeros(args, dtype, FeedForward.zeros, Linear.zeros)
        return cls(
            Attention.zeros(args, window, dtype),
            feed_forward,
            RMSNorm.zeros(args, dtype),
            RMSNorm.zeros(args, dtype),
        )


class Transformer(eqx.Module):
    tok_embeddings: Embedding = sharded(None, "model")  # over dim
    # Every leaf stacked over a leading `layers` axis; each layer's window is applied from
    # `args.window_pattern` when the blocks run (`run_layers`).
    layers: TransformerBlock = stacked("layers")
    norm: RMSNorm = sharded(None)
    output: Linear = sharded("model", None)  # over the vocabulary
    args: ModelArgs = eqx.field(static=True)

    @classmethod
    def zeros(cls, args: ModelArgs, dtype) -> "Transformer":
        """The model with every parameter zero (under `eqx.filter_eval_shape`: shapes only)."""
        layers = eqx.filter_vmap(lambda _: TransformerBlock.zeros(args, None, dtype))(
            jnp.arange(args.n_layers)
        )
        return cls(
            Embedding(jnp.zeros((args.vocab_size, args.dim), dtype)),
            layers,
            RMSNorm.zeros(args, dtype),
            Linear.zeros(args.vocab_size, args.dim, dtype),
            args,
        )

    @property
    def dtype(self) -> jnp.dtype:
        return self.tok_embeddings.weight.dtype

    def __call__(self, tokens: Int[Array, " seq"]) -> Float[Array, "seq vocab"]:
        """fp32 logits for positions 0..T-1 (batch with `jax.vmap`)."""
        return _logits_jit(self, tokens, None, None, collect_hidden=False)[0]

    def forward_hidden(
        self, tokens: Int[Array, " seq"]
    ) -> tuple[Float[Array, "seq vocab"], Float[Array, "layers_plus_2 seq dim"]]:
        """Logits and every hidden state: embeddings, after each block, after the final norm."""
        logits, hidden, _ = _logits_jit(self, tokens, None, None, collect_hidden=True)
        return logits, hidden

    def step(
        self, tokens: Int[Array, " chunk"], positions: Int[Array, " chunk"], cache: KVCache
    ) -> tuple[Float[Array, "chunk vocab"], KVCache]:
        """Run a chunk (prefill or decode) after what `cache` holds; positions -1 are padding."""
        logits, _, cache = _logits_jit(self, tokens, positions, cache, collect_hidden=False)
        return logits, cache

    # The pieces the forward is made of (verify calls these, one at a time).

    def embed(self, tokens: Int[Array, " seq"]) -> Float[Array, "seq dim"]:
        return self.tok_embeddings(tokens)

    def rotary(
        self, positions: Int[Array, " seq"]
    ) -> tuple[Float[Array, "seq half"], Float[Array, "seq half"]]:
        """cos and sin of the rotations every block applies at these positions."""
        return rotary_angles(positions, self.args.head_dim, self.args.rope_theta)

    def head(
        self, h: Float[Array, "seq dim"]
    ) -> tuple[Float[Array, "seq dim"], Float[Array, "seq vocab"]]:
        """Final norm, and fp32 logits (the reference's `.float()`)."""
        normed = self.norm(h)
        return normed, self.output(normed).astype(jnp.float32)


def run_layers(
    model: Transformer,
    tokens: Int[Array, " seq"],
    positions: Int[Array, " seq"],
    cache: KVCache | None,
    *,
    collect_hidden: bool,
) -> tuple[Float[Array, "seq dim"], Float[Array, "layers_plus_1 seq dim"] | None, KVCache | None]:
    """Embeddings → blocks; with a cache, attend to it and update it.

    The layers run as a scan over groups of one window-pattern period (a single layer when
    every layer has the same window), each position of the period with its own window and
    cache buffer: the compiled program does not grow with depth. Returns the last block's
    output, the embeddings and every block's output if `collect_hidden`, and the new cache.
    """
    pattern = model.args.window_pattern
    period, groups = len(pattern), model.args.n_layers // len(pattern)
    cos, sin = model.rotary(positions)
    params, static = eqx.partition(model.layers, eqx.is_array)
    grouped = jax.tree.map(lambda x: x.reshape(groups, period, *x.shape[1:]), params)

    def run_group(h, xs):
        group, cache_k, cache_v = xs
        outs, new_k, new_v = [], [], []
        for k, window in enumerate(pattern):
            block = eqx.combine(jax.tree.map(lambda x, k=k: x[k], group), static)
            block = block.with_window(window)
            cached = None if cache is None else (cache_k[k], cache_v[k], cache.positions[k])
            h, xk, xv = block(h, cos, sin, positions, cached)
            outs.append(h)
            if cache is not None:
                new_k.append(write_slots(cache_k[k], xk, positions))
                new_v.append(write_slots(cache_v[k], xv, positions))
        return h, (jnp.stack(outs) if collect_hidden else None, tuple(new_k), tuple(new_v))

    h0 = model.embed(tokens)
    xs = (grouped, None, None) if cache is None else (grouped, cache.k, cache.v)
    h, (outs, new_k, new_v) = lax.scan(run_group, h0, xs)
    hidden = None
    if collect_hidden:
        hidden = jnp.concatenate([h0[None], outs.reshape(-1, *outs.shape[2:])])
    if cache is not None:
        cache = KVCache(
            new_k, new_v, tuple(write_slots(p, positions, positions) for p in cache.positions)
        )
    return h, hidden, cache


def _logits(model, tokens, positions, cache, *, collect_hidden):
    """Logits (and hidden states, cache); positions None: 0..T-1."""
    if positions is None:
        positions = jnp.arange(tokens.shape[0])
    h, hidden, cache = run_layers(model, tokens, positions, cache, collect_hidden=collect_hidden)
    normed, logits = model.head(h)
    if collect_hidden:
        hidden = jnp.concatenate([hidden, normed[None]])
    return logits, hidden, cache


_logits_jit = eqx.filter_jit(_logits)
