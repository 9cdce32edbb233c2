"""Grouped-query attention in Equinox — mirrors `reference_torch.model.Attention`: RoPE on
interleaved pairs, Llama-4 query scaling, a sliding window of W keys, fp32 softmax."""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from checkpoint.args import ModelArgs
from checkpoint.pieces import Piece
from checkpoint.sections import Llama4ScalingArgs
from model_jax.layers import HIGHEST, Linear
from model_jax.rope import apply_rotary, llama_4_scaled
from model_jax.structure import sharded


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
    cached_values = ("k", "v")  # what the cache holds per token

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

    def pieces(self, x: str, out: str) -> tuple[Piece, ...]:
        """As `reference_torch.model.Attention.pieces`."""
        return (
            Piece("qkv", self.project, (x, "rope", "positions"), ("q", "k", "v")),
            Piece("attention", self.attend, ("q", "k", "v", "positions", "cached"), (out,)),
        )

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
