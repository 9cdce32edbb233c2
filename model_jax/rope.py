"""Rotary embeddings on interleaved pairs, in fp32 — mirrors `reference_torch/rope.py`."""

import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def rotary_angles(
    positions: Int[Array, " seq"], head_dim: int, theta: float
) -> tuple[Float[Array, "seq half"], Float[Array, "seq half"]]:
    """cos and sin of position × 1/θ^(2i/head_dim), fp32."""
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32)[: head_dim // 2] / head_dim
    freqs = 1.0 / (theta**exponents)
    angles = positions.astype(jnp.float32)[:, None] * freqs[None, :]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(
    x: Float[Array, "seq heads head_dim"],
    cos: Float[Array, "seq half"],
    sin: Float[Array, "seq half"],
) -> Float[Array, "seq heads head_dim"]:
    """Rotate each pair (x[2i], x[2i+1]) as the complex number x[2i] + i·x[2i+1]."""
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    re, im = pairs[..., 0], pairs[..., 1]
    c, s = cos[:, None, :], sin[:, None, :]
    rotated = jnp.stack([re * c - im * s, re * s + im * c], axis=-1)
    return rotated.reshape(x.shape).astype(x.dtype)
