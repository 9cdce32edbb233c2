"""Rotary embeddings on interleaved pairs, in fp32 — mistral-inference `rope.py`
(`precompute_freqs_cis`, `apply_rotary_emb`); in float64 for a float64 model."""

import torch

from reference_torch.precision import at_least_fp32


def freqs_cis(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Unit complex rotations `[T, head_dim // 2]` for the given absolute positions, their
    angles computed in `dtype` (float32, as the reference; float64 for the truth)."""
    exponents = torch.arange(0, head_dim, 2)[: head_dim // 2].to(dtype) / head_dim
    freqs = 1.0 / (theta**exponents)
    angles = torch.outer(positions.to(freqs.device).to(dtype), freqs)
    return torch.polar(torch.ones_like(angles), angles).to(positions.device)


def apply_rotary_emb(x: torch.Tensor, cis: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., 0::2], x[..., 1::2]) of `x` (B, T, H, D) by `cis` (T, D/2)."""
    x_complex = torch.view_as_complex(at_least_fp32(x).reshape(*x.shape[:-1], -1, 2))
    rotated = torch.view_as_real(x_complex * cis[None, :, None, :]).flatten(3)
    return rotated.type_as(x)
