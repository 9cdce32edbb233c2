"""Rotary embeddings on interleaved pairs, in fp32 — mirrors `reference_torch/rope.py`:
YaRN's frequencies and magnitude from `checkpoint.rope`, Llama-4 query scaling."""

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from checkpoint.args import ModelArgs
from checkpoint.rope import rope_frequencies, rope_magnitude, rotary_dim
from checkpoint.sections import Llama4ScalingArgs


def rotary_angles(
    positions: Int[Array, " seq"], args: ModelArgs
) -> tuple[Float[Array, "seq half"], Float[Array, "seq half"]]:
    """cos and sin of position × frequency (fp32), times YaRN's attention factor."""
    freqs = jnp.asarray(rope_frequencies(rotary_dim(args), args.rope_theta, args.yarn, np.float32))
    angles = positions.astype(jnp.float32)[:, None] * freqs[None, :]
    magnitude = rope_magnitude(args)
    return jnp.cos(angles) * magnitude, jnp.sin(angles) * magnitude


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


def llama_4_scaled(
    q: Float[Array, "seq heads head_dim"],
    positions: Int[Array, " seq"],
    scaling: Llama4ScalingArgs | None,
) -> Float[Array, "seq heads head_dim"]:
    """Queries × (1 + β·ln(1 + ⌊pos / original⌋)): the product in fp32, one rounding. Padding
    (position −1) is scaled as position 0: the formula never sees a negative position."""
    if scaling is None:
        return q
    steps = jnp.floor(
        jnp.maximum(positions, 0).astype(jnp.float32) / scaling.original_max_position_embeddings
    )
    scale = 1.0 + scaling.beta * jnp.log1p(steps)
    return (q.astype(jnp.float32) * scale[:, None, None]).astype(q.dtype)
