"""Multi-head latent attention in Equinox — mirrors `reference_torch/latent.py` piece for
piece (`q_path`, `kv_latent`, `attention`), with the same parameter names. The cache holds each
token's kv latent and shared rope key, not the expanded heads."""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from checkpoint.args import ModelArgs
from checkpoint.pieces import Piece
from checkpoint.sections import Llama4ScalingArgs
from model_jax.layers import HIGHEST, Linear, RMSNorm
from model_jax.rope import apply_rotary, llama_4_scaled
from model_jax.structure import sharded


def softmax_factor(args: ModelArgs) -> float:
    """As `reference_torch.latent.softmax_factor`: YaRN's magnitude² if `apply_scale`."""
    yarn = args.yarn
    return yarn.magnitude**2 if yarn is not None and yarn.apply_scale else 1.0


class LatentAttention(eqx.Module):
    wq_a: Linear = sharded(None, None)  # dim → q_lora_rank (small: replicated)
    q_a_norm: RMSNorm = sharded(None)
    wq_b: Linear = sharded("model", None)  # rows: heads
    wkv_a_with_mqa: Linear = sharded(None, None)  # dim → kv_lora_rank + rope
    kv_a_norm: RMSNorm = sharded(None)
    wkv_b: Linear = sharded("model", None)  # rows: heads
    wo: Linear = sharded(None, "model")  # columns: heads
    n_heads: int = eqx.field(static=True)
    nope: int = eqx.field(static=True)
    rope: int = eqx.field(static=True)
    v_dim: int = eqx.field(static=True)
    scale: float = eqx.field(static=True)
    llama_4_scaling: Llama4ScalingArgs | None = eqx.field(static=True)
    cached_values = ("kv_latent", "k_rope")  # what the cache holds per token

    def with_window(self, window: int | None) -> "LatentAttention":
        assert window is None
        return self

    def queries(
        self, x: Float[Array, "seq dim"], rope: tuple[Array, Array], positions: Int[Array, " seq"]
    ) -> Float[Array, "seq heads head_dim"]:
        T = x.shape[0]
        q = self.wq_b(self.q_a_norm(self.wq_a(x))).reshape(T, self.n_heads, -1)
        q_rope = apply_rotary(q[..., self.nope :], *rope)
        q = jnp.concatenate([q[..., : self.nope], q_rope], axis=-1)
        return llama_4_scaled(q, positions, self.llama_4_scaling)

    def latent(
        self, x: Float[Array, "seq dim"], rope: tuple[Array, Array]
    ) -> tuple[Float[Array, "seq kv_lora"], Float[Array, "seq rope"]]:
        kv = self.wkv_a_with_mqa(x)
        latent, k_rope = kv[:, : -self.rope], kv[:, -self.rope :]
        return self.kv_a_norm(latent), apply_rotary(k_rope[:, None], *rope)[:, 0]

    def attend(
        self,
        q: Float[Array, "seq heads head_dim"],
        kv_latent: Float[Array, "seq kv_lora"],
        k_rope: Float[Array, "seq rope"],
        positions: Int[Array, " seq"],
        cached: tuple[Array, Array, Array] | None = None,
    ) -> Float[Array, "seq dim"]:
        key_pos = positions
        if cached is not None:
            cache_latent, cache_rope, cache_pos = cached
            kv_latent = jnp.concatenate([cache_latent, kv_latent])
            k_rope = jnp.concatenate([cache_rope, k_rope])
            key_pos = jnp.concatenate([cache_pos, positions])
        S = kv_latent.shape[0]
        kv = self.wkv_b(kv_latent).reshape(S, self.n_heads, self.nope + self.v_dim)
        k_nope, values = kv[..., : self.nope], kv[..., self.nope :]
        shared = jnp.broadcast_to(k_rope[:, None], (S, self.n_heads, self.rope))
        keys = jnp.concatenate([k_nope, shared], axis=-1)
        scores = jnp.einsum("thd,shd->hts", q, keys, precision=HIGHEST)
        # As the reference: a bf16 product with a Python float is one fp32 product, rounded.
        scores = (scores.astype(jnp.float32) * self.scale).astype(q.dtype)
        visible = (key_pos[None, :] >= 0) & (key_pos[None, :] <= positions[:, None])
        scores = jnp.where(visible, scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
        out = jnp.einsum("hts,shd->thd", probs, values, precision=HIGHEST)
        return self.wo(out.reshape(q.shape[0], -1))

    def pieces(self, x: str, out: str) -> tuple[Piece, ...]:
        """As `reference_torch.latent.LatentAttention.pieces`."""
        return (
            Piece("q_path", self.queries, (x, "rope", "positions"), ("q",)),
            Piece("kv_latent", self.latent, (x, "rope"), ("kv_latent", "k_rope")),
            Piece(
                "attention",
                self.attend,
                ("q", "kv_latent", "k_rope", "positions", "cached"),
                (out,),
            ),
        )

    @classmethod
    def zeros(cls, args: ModelArgs, window: int | None, dtype) -> "LatentAttention":
        assert window is None  # ModelArgs refuses windows with latent attention
        linear = Linear.zeros
        h, d = args.n_heads, args.dim
        nope, rope, v = args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim
        return cls(
            linear(args.q_lora_rank, d, dtype),
            RMSNorm.zeros(args.q_lora_rank, args.norm_eps, dtype),
            linear(h * (nope + rope), args.q_lora_rank, dtype),
            linear(args.kv_lora_rank + rope, d, dtype),
            RMSNorm.zeros(args.kv_lora_rank, args.norm_eps, dtype),
            linear(h * (nope + v), args.kv_lora_rank, dtype),
            linear(d, h * v, dtype),
            h,
            nope,
            rope,
            v,
            args.head_dim**-0.5 * softmax_factor(args),
            args.llama_4_scaling,
        )
