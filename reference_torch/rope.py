"""Rotary embeddings on interleaved pairs, in fp32 — mistral-inference `rope.py`
(`precompute_freqs_cis`, `apply_rotary_emb`), with YaRN's frequencies and magnitude
(`checkpoint.rope`) and Llama-4 query scaling (HF `ministral3`, vLLM `mistral.py`); in float64
for a float64 model."""

import numpy as np
import torch

from checkpoint.args import ModelArgs
from checkpoint.rope import rope_frequencies, rope_magnitude, rotary_dim
from checkpoint.sections import Llama4ScalingArgs
from reference_torch.precision import at_least_fp32


def freqs_cis(positions: torch.Tensor, args: ModelArgs, dtype: torch.dtype) -> torch.Tensor:
    """Complex rotations `[T, head_dim // 2]` for the given absolute positions, of magnitude
    YaRN's attention factor (1 for plain RoPE); angles position × frequency in `dtype`."""
    numpy_dtype = np.float64 if dtype == torch.float64 else np.float32
    freqs = torch.from_numpy(
        rope_frequencies(rotary_dim(args), args.rope_theta, args.yarn, numpy_dtype)
    )
    angles = torch.outer(positions.to("cpu", dtype), freqs)
    magnitude = torch.full_like(angles, rope_magnitude(args))
    return torch.polar(magnitude, angles).to(positions.device)


def apply_rotary_emb(x: torch.Tensor, cis: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., 0::2], x[..., 1::2]) of `x` (B, T, H, D) by `cis` (T, D/2)."""
    x_complex = torch.view_as_complex(at_least_fp32(x).reshape(*x.shape[:-1], -1, 2))
    rotated = torch.view_as_real(x_complex * cis[None, :, None, :]).flatten(3)
    return rotated.type_as(x)


def llama_4_scaled(
    q: torch.Tensor, positions: torch.Tensor, scaling: Llama4ScalingArgs | None
) -> torch.Tensor:
    """Queries (B, T, H, D) × (1 + β·ln(1 + ⌊pos / original⌋)) at each position: the product
    in at least fp32, one rounding (vLLM's order; HF rounds the scale to bf16 first)."""
    if scaling is None:
        return q
    wide = at_least_fp32(q)
    steps = torch.floor(positions.to(wide.dtype) / scaling.original_max_position_embeddings)
    scale = 1.0 + scaling.beta * torch.log1p(steps)
    return (wide * scale[None, :, None, None]).type_as(q)
