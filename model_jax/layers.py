"""The basic layers both kinds of block are made of: Linear (optionally FP8), Embedding,
RMSNorm — mirroring `torch.nn.Linear`, `torch.nn.Embedding` and `reference_torch.norm`."""

import equinox as eqx
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Int, Shaped

HIGHEST = lax.Precision.HIGHEST  # fp32 matmuls stay fp32 on GPU/TPU (no TF32)


class Linear(eqx.Module):
    """A bias-free linear layer in torch layout, its weight in the compute dtype or in FP8
    with `qscale_weight` (or block FP8's `weight_scale`) beside it (weight-only FP8:
    dequantized inside the matmul, the product in fp32 then rounded to the compute dtype, as
    the reference dequantizes at load)."""

    weight: Shaped[Array, "*stack out in"]  # leading axes when stacked
    # 1 per tensor, or 1 per row; placed like the weight's rows (model_jax.structure).
    qscale_weight: Float[Array, "*stack scales"] | None = eqx.field(
        default=None, metadata={"rows_of": "weight"}
    )
    # Block FP8: one scale per `block` (rows × columns) of the weight, the last ones partial;
    # replicated on a mesh (1/16384 of the weight's elements at 128×128).
    weight_scale: Float[Array, "*stack row_blocks col_blocks"] | None = eqx.field(
        default=None, metadata={"blocks_of": "weight"}
    )
    block: tuple[int, int] | None = eqx.field(default=None, static=True)

    def __call__(self, x: Float[Array, "seq in"]) -> Float[Array, "seq out"]:
        return jnp.matmul(x, self.dequantized(x.dtype).T, precision=HIGHEST)

    def dequantized(self, dtype) -> Float[Array, "*stack out in"]:
        if self.weight_scale is not None:
            return (self.weight.astype(jnp.float32) * self._block_scales()).astype(dtype)
        if self.qscale_weight is None:
            return self.weight.astype(dtype)
        real = self.weight.astype(jnp.float32) * self.qscale_weight[..., None]
        return real.astype(dtype)

    def _block_scales(self) -> Float[Array, "*stack out in"]:
        """Each weight element's block scale."""
        (rows, cols), (row_block, col_block) = self.weight.shape[-2:], self.block
        by_row = jnp.repeat(self.weight_scale, row_block, axis=-2)[..., :rows, :]
        return jnp.repeat(by_row, col_block, axis=-1)[..., :cols]

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
    def zeros(cls, dim: int, eps: float, dtype) -> "RMSNorm":
        return cls(jnp.zeros((dim,), dtype), eps)
