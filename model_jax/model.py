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
from jaxtyping import Array, Bool, Float, Int, Shaped

from checkpoint.args import ModelArgs
from checkpoint.pieces import Piece, run_pieces
from checkpoint.sections import Llama4ScalingArgs
from model_jax.cache import KVCache, write_slots
from model_jax.moe import MoeFeedForward
from model_jax.rope import apply_rotary, llama_4_scaled, rotary_angles
from model_jax.structure import sharded, stacked

HIGHEST = lax.Precision.HIGHEST  # fp32 matmuls stay fp32 on GPU/TPU (no TF32)


class Linear(eqx.Module):
    """A bias-free linear layer in torch layout, its weight in the compute dtype or in FP8
    with `qscale_weight` beside it (weight-only FP8: dequantized inside the matmul, the
    product in fp32 then rounded to the compute dtype, as the reference dequantizes at load)."""

    weight: Shaped[Array, "*stack out in"]  # leading axes when stacked
    # 1 per tensor, or 1 per row; placed like the weight's rows (model_jax.structure).
    qscale_weight: Float[Array, "*stack scales"] | None = eqx.field(
        default=None, metadata={"rows_of": "weight"}
    )

    def __call__(self, x: Float[Array, "seq in"]) -> Float[Array, "seq out"]:
        return jnp.matmul(x, self.dequantized(x.dtype).T, precision=HIGHEST)

    def dequantized(self, dtype) -> Float[Array, "out in"]:
        if self.qscale_weight is None:
            return self.weight
        real = self.weight.astype(jnp.float32) * self.qscale_weight.reshape(-1, 1)
        return real.astype(dtype)

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
    llama_4_scaling: Llama4ScalingArgs | None = eqx.field(static=True)

    def project(
        self, x: Float[Array, "seq dim"], rope: tuple[Array, Array], positions: Int[Array, " seq"]
    ) -> tuple[
        Float[Array, "seq heads head_dim"],
        Float[Array, "seq kv_heads head_dim"],
        Float[Array, "seq kv_heads head_dim"],
    ]:
        """Queries, keys and values of x; queries and keys rotated by `rope` (cos, sin),
        queries then scaled for their positions (Llama-4 scaling, where the config has it)."""
        T = x.shape[0]
        cos, sin = rope
        xq = apply_rotary(self.wq(x).reshape(T, self.n_heads, self.head_dim), cos, sin)
        xk = apply_rotary(self.wk(x).reshape(T, self.n_kv_heads, self.head_dim), cos, sin)
        xq = llama_4_scaled(xq, positions, self.llama_4_scaling)
        return xq, xk, self.wv(x).reshape(T, self.n_kv_heads, self.head_dim)

    def attend(
        self,
        xq: Float[Array, "seq heads head_dim"],
        xk: Float[Array, "seq kv_heads head_dim"],
        xv: Float[Array, "seq kv_heads head_dim"],
        positions: Int[Array, " seq"],
        cached: tuple[Array, Array, Array] | None = None,
    ) -> Float[Array, "seq dim"]:
        """The queries attend over the cached keys and the chunk's own."""
        T, rep = xq.shape[0], self.n_heads // self.n_kv_heads
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
        scores = (scores.astype(jnp.float32) * self.head_dim**-0.5).astype(xq.dtype)
        visible = attention_mask(positions, key_pos, self.sliding_window)
        scores = jnp.where(visible, scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(xq.dtype)
        out = jnp.einsum("grts,sgd->tgrd", probs, values, precision=HIGHEST)
        return self.wo(out.reshape(T, -1))

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
            args.llama_4_scaling,
        )


class FeedForward(eqx.Module):
    w1: Linear = sharded("model", None)  # rows: hidden_dim
    w2: Linear = sharded(None, "model")  # columns: hidden_dim
    w3: Linear = sharded("model", None)

    def __call__(self, x: Float[Array, "seq dim"]) -> Float[Array, "seq dim"]:
        gate = jax.nn.silu(self.w1(x).astype(jnp.float32)).astype(x.dtype)
        return self.w2(gate * self.w3(x))

    def pieces(self, x: str, out: str) -> tuple[Piece, ...]:
        return (Piece("feed_forward", self, (x,), (out,)),)

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

    def pieces(self) -> tuple[Piece, ...]:
        """The forward, step by step (`checkpoint.pieces`), as `reference_torch` declares it."""
        attention = self.attention
        return (
            Piece("attention_norm", self.attention_norm, ("x",), ("x_normed",)),
            Piece("qkv", attention.project, ("x_normed", "rope", "positions"), ("q", "k", "v")),
            Piece("attention", attention.attend, ("q", "k", "v", "positions", "cached"), ("attn",)),
            Piece("attention_residual", jnp.add, ("x", "attn"), ("h",), judged=False),
            Piece("ffn_norm", self.ffn_norm, ("h",), ("h_normed",)),
            *self.feed_forward.pieces("h_normed", "ffn"),
            Piece("ffn_residual", jnp.add, ("h", "ffn"), ("out",), judged=False),
        )

    def __call__(
        self,
        x: Float[Array, "seq dim"],
        rope: tuple[Array, Array],
        positions: Int[Array, " seq"],
        cached: tuple[Array, Array, Array] | None = None,
    ) -> tuple[
        Float[Array, "seq dim"],
        Float[Array, "seq kv_heads head_dim"],
        Float[Array, "seq kv_heads head_dim"],
    ]:
        """(seq, dim) → (seq, dim), plus the chunk's keys and values for the cache."""
        values = run_pieces(
            self.pieces(), {"x": x, "rope": rope, "positions": positions, "cached": cached}
        )
        return values["out"], values["k"], values["v"]

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


def group_block(group: TransformerBlock, k: int, window: int | None) -> TransformerBlock:
    """Block k of a group of stacked blocks (every leaf with a leading `period` axis), with its
    window: the one way a block is taken out of the stacked weights — the forward's scan and
    verify (whole or streamed) all take it here."""
    params, static = eqx.partition(group, eqx.is_array)
    return eqx.combine(jax.tree.map(lambda x: x[k], params), static).with_window(window)


def run_group(
    group: TransformerBlock,
    pattern: tuple[int | None, ...],
    h: Float[Array, "seq dim"],
    rope: tuple[Array, Array],
    positions: Int[Array, " seq"],
    cached: tuple[tuple, tuple, tuple] | None = None,
) -> tuple[Float[Array, "period seq dim"], tuple, tuple]:
    """The scan's body: the blocks of one window-pattern period in order, each with its own
    window and cache buffer. Every block's output, and the chunk's keys and values per block."""
    outs, keys, values = [], [], []
    for k, window in enumerate(pattern):
        block = group_block(group, k, window)
        layer_cache = None if cached is None else tuple(c[k] for c in cached)
        h, xk, xv = block(h, rope, positions, layer_cache)
        outs.append(h)
        keys.append(xk)
        values.append(xv)
    return jnp.stack(outs), tuple(keys), tuple(values)


class Transformer(eqx.Module):
    tok_embeddings: Embedding = sharded(None, "model")  # over dim
    # Every leaf stacked over a leading `layers` axis; each layer's window is applied from
    # `args.window_pattern` when a block is taken out of the stack (`group_block`).
    layers: TransformerBlock = stacked("layers")
    norm: RMSNorm = sharded(None)
    output: Linear | None = sharded("model", None)  # over the vocabulary; None: tied
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
            None if args.tied_embeddings else Linear.zeros(args.vocab_size, args.dim, dtype),
            args,
        )

    def groups(self) -> TransformerBlock:
        """The stacked blocks regrouped by window-pattern period: leaves [groups, period, …]
        (a view, no copy), as the forward's scan runs them."""
        period = len(self.args.window_pattern)
        params, static = eqx.partition(self.layers, eqx.is_array)
        grouped = jax.tree.map(lambda x: x.reshape(-1, period, *x.shape[1:]), params)
        return eqx.combine(grouped, static)

    def group(self, g: int) -> TransformerBlock:
        """Group g of `groups()`: the blocks the scan's body runs at step g."""
        params, static = eqx.partition(self.groups(), eqx.is_array)
        return eqx.combine(jax.tree.map(lambda x: x[g], params), static)

    def block(self, i: int) -> TransformerBlock:
        """Block i exactly as the forward runs it (its group's slice, its window)."""
        pattern = self.args.window_pattern
        return group_block(
            self.group(i // len(pattern)), i % len(pattern), pattern[i % len(pattern)]
        )

    @property
    def dtype(self) -> jnp.dtype:
        return self.tok_embeddings.weight.dtype

    def __call__(self, tokens: Int[Array, " seq"]) -> Float[Array, "seq vocab"]:
        """fp32 logits for positions 0..T-1 (batch with `jax.vmap`)."""
        return _logits_jit(self, tokens, None, None, collect_hidden=False)[0]

    def forward_hidden(
        self, tokens: Int[Array, " seq"], start: int | Int[Array, ""] = 0
    ) -> tuple[Float[Array, "seq vocab"], Float[Array, "layers_plus_2 seq dim"]]:
        """Logits and every hidden state (embeddings, after each block, after the final norm)
        of `tokens` at positions start, start+1, …"""
        positions = start + jnp.arange(tokens.shape[0])
        logits, hidden, _ = _logits_jit(self, tokens, positions, None, collect_hidden=True)
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
        """The `rope` context of every block: cos and sin of the rotations at `positions`."""
        return rotary_angles(positions, self.args)

    def head(
        self, h: Float[Array, "seq dim"]
    ) -> tuple[Float[Array, "seq dim"], Float[Array, "seq vocab"]]:
        """Final norm, and fp32 logits (the reference's `.float()`)."""
        normed = self.norm(h)
        head = Linear(self.tok_embeddings.weight) if self.output is None else self.output
        return normed, head(normed).astype(jnp.float32)


def run_layers(
    model: "Transformer",
    tokens: Int[Array, " seq"],
    positions: Int[Array, " seq"],
    cache: KVCache | None,
    *,
    collect_hidden: bool,
) -> tuple[Float[Array, "seq dim"], Float[Array, "layers_plus_1 seq dim"] | None, KVCache | None]:
    """Embeddings → blocks; with a cache, attend to it and update it.

    The layers run as a scan of `run_group` over groups of one window-pattern period (a
    single layer when every layer has the same window): the compiled program does not grow
    with depth. Returns the last block's output, the embeddings and every block's output if
    `collect_hidden`, and the new cache.
    """
    pattern = model.args.window_pattern
    rope = model.rotary(positions)

    def scan_body(h, xs):
        group, stored = xs
        cached = None if stored is None else (*stored, cache.positions)
        outs, xk, xv = run_group(group, pattern, h, rope, positions, cached)
        new = None
        if cached is not None:
            new = (
                tuple(write_slots(b, x, positions) for b, x in zip(stored[0], xk, strict=True)),
                tuple(write_slots(b, x, positions) for b, x in zip(stored[1], xv, strict=True)),
            )
        return outs[-1], (outs if collect_hidden else None, new)

    h0 = model.embed(tokens)
    stored = None if cache is None else (cache.k, cache.v)
    h, (outs, new) = lax.scan(scan_body, h0, (model.groups(), stored))
    hidden = None
    if collect_hidden:
        hidden = jnp.concatenate([h0[None], outs.reshape(-1, *outs.shape[2:])])
    if cache is not None:
        new_k, new_v = new
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
