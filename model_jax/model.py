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
from jaxtyping import Array, Float, Int

from checkpoint.args import ModelArgs
from checkpoint.pieces import Piece, run_pieces
from checkpoint.sections import MoeArgs
from model_jax.attention import Attention, attention_mask
from model_jax.cache import KVCache, write_slots
from model_jax.latent import LatentAttention
from model_jax.layers import HIGHEST, Embedding, Linear, RMSNorm
from model_jax.moe import MoeFeedForward, fine_grained_route, sparse_mix
from model_jax.rope import rotary_angles
from model_jax.structure import sharded, stacked

__all__ = ["HIGHEST", "Attention", "Embedding", "Linear", "RMSNorm", "attention_mask"]


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
    def zeros(cls, args: ModelArgs, dtype, hidden_dim: int | None = None) -> "FeedForward":
        hidden = hidden_dim or args.hidden_dim
        return cls(
            Linear.zeros(hidden, args.dim, dtype),
            Linear.zeros(args.dim, hidden, dtype),
            Linear.zeros(hidden, args.dim, dtype),
        )


class TransformerBlock(eqx.Module):
    """Attention (grouped-query or latent) and an FFN: dense, Mixtral's MoE, or the
    fine-grained MoE whose `gate`, `experts` and `shared_experts` sit at the block's top level
    — as `reference_torch.model.TransformerBlock`."""

    attention: Attention | LatentAttention
    feed_forward: FeedForward | MoeFeedForward | None
    attention_norm: RMSNorm = sharded(None)
    ffn_norm: RMSNorm = sharded(None)
    gate: Linear | None = sharded(None, None, default=None)  # fine-grained MoE: the router
    experts: FeedForward | None = stacked("experts", "expert", default=None)  # whole per device
    shared_experts: FeedForward | None = None
    moe: MoeArgs | None = eqx.field(static=True, default=None)  # fine-grained routing

    def pieces(self) -> tuple[Piece, ...]:
        """The forward, step by step (`checkpoint.pieces`), as `reference_torch` declares it."""
        return (
            Piece("attention_norm", self.attention_norm, ("x",), ("x_normed",)),
            *self.attention.pieces("x_normed", "attn"),
            Piece("attention_residual", jnp.add, ("x", "attn"), ("h",), judged=False),
            Piece("ffn_norm", self.ffn_norm, ("h",), ("h_normed",)),
            *self._ffn_pieces("h_normed", "ffn"),
            Piece("ffn_residual", jnp.add, ("h", "ffn"), ("out",), judged=False),
        )

    def _ffn_pieces(self, x: str, out: str) -> tuple[Piece, ...]:
        if self.moe is None:
            return self.feed_forward.pieces(x, out)
        return (
            Piece("router", self.route, (x,), ("expert_weights", "experts", "experts_scores")),
            Piece("experts", self.mix, (x, "expert_weights", "experts"), ("routed",)),
            Piece("shared_experts", self.shared, (x,), ("shared",)),
            Piece("moe_sum", jnp.add, ("routed", "shared"), (out,), judged=False),
        )

    def route(
        self, x: Float[Array, "seq dim"]
    ) -> tuple[Float[Array, "seq k"], Int[Array, "seq k"], Float[Array, "seq experts"]]:
        """Fine-grained routing, the gate in fp32 (as the reference); with the scores."""
        logits = jnp.matmul(
            x.astype(jnp.float32), self.gate.dequantized(jnp.float32).T, precision=HIGHEST
        )
        return fine_grained_route(logits, self.moe)

    def mix(self, x, weights, selected, first=0, out=None) -> Float[Array, "seq dim"]:
        """The routed experts' weighted sum; `first`, `out`: this block holds only experts
        `first`, … and adds theirs to `out` (streamed within a layer, `sparse_mix`)."""
        return sparse_mix(self.experts, x, weights, selected, first, out)

    def shared(self, x: Float[Array, "seq dim"]) -> Float[Array, "seq dim"]:
        if self.shared_experts is None:
            return jnp.zeros_like(x)
        return self.shared_experts(x)

    def __call__(
        self,
        x: Float[Array, "seq dim"],
        rope: tuple[Array, Array],
        positions: Int[Array, " seq"],
        cached: tuple[Array, Array, Array] | None = None,
    ) -> tuple[Float[Array, "seq dim"], Array, Array]:
        """(seq, dim) → (seq, dim), plus what the cache keeps of the chunk (keys and values,
        or the latent and the rope key)."""
        values = run_pieces(
            self.pieces(), {"x": x, "rope": rope, "positions": positions, "cached": cached}
        )
        first, second = self.attention.cached_values
        return values["out"], values[first], values[second]

    def with_window(self, window: int | None) -> "TransformerBlock":
        """The same block attending over `window` keys (None: all)."""
        if isinstance(self.attention, LatentAttention):
            return self
        attention = dataclasses.replace(self.attention, sliding_window=window)
        return eqx.tree_at(lambda b: b.attention, self, attention)

    @classmethod
    def zeros(cls, args: ModelArgs, window: int | None, dtype, routed: bool) -> "TransformerBlock":
        """A block of `args`; `routed`: its FFN is the MoE (else dense)."""
        kind = LatentAttention if args.latent else Attention
        norms = (RMSNorm.zeros(args.dim, args.norm_eps, dtype),) * 2
        if routed and args.moe.fine_grained:
            moe = args.moe
            experts = eqx.filter_vmap(
                lambda _: FeedForward.zeros(args, dtype, moe.expert_hidden_dim)
            )(jnp.arange(moe.num_experts))
            shared = moe.num_shared_experts * moe.expert_hidden_dim
            return cls(
                kind.zeros(args, window, dtype),
                None,
                *norms,
                Linear.zeros(moe.num_experts, args.dim, dtype),
                experts,
                FeedForward.zeros(args, dtype, shared) if shared else None,
                moe,
            )
        feed_forward = FeedForward.zeros(args, dtype)
        if routed:
            feed_forward = MoeFeedForward.zeros(args, dtype, FeedForward.zeros, Linear.zeros)
        return cls(kind.zeros(args, window, dtype), feed_forward, *norms)


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
    # `args.window_pattern` when a block is taken out of the stack (`group_block`). The first
    # `args.dense_layers` blocks (dense FFNs before the MoE ones) are a stack of their own, named
    # `layers.N` in the checkpoint all the same.
    dense_layers: TransformerBlock | None = stacked("layers", checkpoint="layers")
    layers: TransformerBlock = stacked("layers")
    norm: RMSNorm = sharded(None)
    output: Linear | None = sharded("model", None)  # over the vocabulary; None: tied
    args: ModelArgs = eqx.field(static=True)

    @classmethod
    def zeros(cls, args: ModelArgs, dtype) -> "Transformer":
        """The model with every parameter zero (under `eqx.filter_eval_shape`: shapes only)."""

        def stack(count: int, routed: bool) -> TransformerBlock:
            return eqx.filter_vmap(lambda _: TransformerBlock.zeros(args, None, dtype, routed))(
                jnp.arange(count)
            )

        dense = args.dense_layers
        return cls(
            Embedding(jnp.zeros((args.vocab_size, args.dim), dtype)),
            stack(dense, routed=False) if dense else None,
            stack(args.n_layers - dense, routed=args.moe is not None),
            RMSNorm.zeros(args.dim, args.norm_eps, dtype),
            None if args.tied_embeddings else Linear.zeros(args.vocab_size, args.dim, dtype),
            args,
        )

    def stacks(self) -> tuple[tuple[TransformerBlock, int], ...]:
        """The stacks of blocks in order, each with the index of its first layer."""
        main = ((self.layers, self.args.dense_layers),)
        return main if self.dense_layers is None else ((self.dense_layers, 0), *main)

    def groups(self, stack: TransformerBlock) -> TransformerBlock:
        """A stack of blocks regrouped by window-pattern period: leaves [groups, period, …]
        (a view, no copy), as the forward's scan runs them."""
        period = len(self.args.window_pattern)
        params, static = eqx.partition(stack, eqx.is_array)
        grouped = jax.tree.map(lambda x: x.reshape(-1, period, *x.shape[1:]), params)
        return eqx.combine(grouped, static)

    def group(self, g: int) -> TransformerBlock:
        """The blocks the scan's body runs for `args.layer_groups[g]`."""
        first = self.args.layer_groups[g][0]
        stack, start = next((s, i) for s, i in reversed(self.stacks()) if first >= i)
        params, static = eqx.partition(self.groups(stack), eqx.is_array)
        index = (first - start) // len(self.args.window_pattern)
        return eqx.combine(jax.tree.map(lambda x: x[index], params), static)

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

    Each stack of blocks (the dense-first ones, then the rest) runs as a scan of `run_group`
    over groups of one window-pattern period (a single layer when every layer has the same
    window): the compiled program does not grow with depth. Returns the last block's output,
    the embeddings and every block's output if `collect_hidden`, and the new cache.
    """
    pattern = model.args.window_pattern
    rope = model.rotary(positions)

    def scan_body(h, xs):
        group, stored = xs
        cached = None if stored is None else (*stored, cache.positions)
        outs, first, second = run_group(group, pattern, h, rope, positions, cached)
        new = None
        if cached is not None:
            new = tuple(
                tuple(write_slots(b, x, positions) for b, x in zip(buffers, xs, strict=True))
                for buffers, xs in zip(stored, (first, second), strict=True)
            )
        return outs[-1], (outs if collect_hidden else None, new)

    h = h0 = model.embed(tokens)
    hidden, updated = [h0[None]], []
    for stack, start in model.stacks():
        groups = model.groups(stack)
        count = jax.tree.leaves(groups)[0].shape[0]
        first_group = start // len(pattern)
        stored = None
        if cache is not None:  # this stack's groups of the cache
            span = slice(first_group, first_group + count)
            stored = tuple(tuple(b[span] for b in buffers) for buffers in (cache.k, cache.v))
        h, (outs, new) = lax.scan(scan_body, h, (groups, stored))
        if collect_hidden:
            hidden.append(outs.reshape(-1, *outs.shape[2:]))
        updated.append(new)
    if cache is not None:
        k, v = (
            tuple(jnp.concatenate(parts) for parts in zip(*(u[i] for u in updated), strict=True))
            for i in (0, 1)
        )
        cache = KVCache(k, v, tuple(write_slots(p, positions, positions) for p in cache.positions))
    return h, jnp.concatenate(hidden) if collect_hidden else None, cache


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
