"""The rotary frequencies and position scalings of a config, as numbers both models use.

Frequencies are computed once on the host in float64 and rounded to float32, so the torch
reference and the JAX port rotate by bit-identical frequencies (torch's and XLA's float32 `pow`
may differ by an ulp, which grows into a visible angle at far positions). Plain RoPE:
1/θ^(2i/d). YaRN (`yarn` in params.json; HF `_compute_yarn_parameters`, vLLM
`yarn_scaling_rope.py`): NTK-by-parts — dimensions rotating faster than `beta` turns over the
original length keep their frequency, those slower than `alpha` turns are divided by `factor`,
a linear ramp in between (correction dimensions floored and ceiled, as HF's default
`truncate`) — and cos/sin multiplied by `YarnArgs.attention_factor`.
"""

import math

import numpy as np

from checkpoint.args import ModelArgs
from checkpoint.sections import Llama4ScalingArgs, YarnArgs


def rope_frequencies(
    rotary_dim: int, theta: float, yarn: YarnArgs | None, dtype=np.float32
) -> np.ndarray:
    """Inverse frequencies of the `rotary_dim // 2` pairs, computed in float64 and rounded to
    `dtype` (float32 for the models; float64 for verify's float64 truth)."""
    exponents = np.arange(0, rotary_dim, 2, dtype=np.float64)[: rotary_dim // 2] / rotary_dim
    extrapolation = 1.0 / theta**exponents
    if yarn is None:
        return extrapolation.astype(dtype)
    interpolation = extrapolation / yarn.factor
    low, high = _correction_range(yarn, rotary_dim, theta)
    ramp = np.clip((np.arange(rotary_dim // 2) - low) / (high - low), 0.0, 1.0)
    return (interpolation * ramp + extrapolation * (1.0 - ramp)).astype(dtype)


def _correction_range(yarn: YarnArgs, dim: int, theta: float) -> tuple[float, float]:
    """The pair indices where `beta` and `alpha` full turns fit in the original length."""

    def dimension(turns: float) -> float:
        length = yarn.original_max_position_embeddings
        return dim * math.log(length / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(dimension(yarn.beta)), 0)
    high = min(math.ceil(dimension(yarn.alpha)), dim - 1)
    return low, high + 0.001 if low == high else high


def rotary_dim(args: ModelArgs) -> int:
    """The dimensions RoPE rotates: the whole head, or a latent attention head's rope part."""
    return args.qk_rope_head_dim if args.latent else args.head_dim


def rope_magnitude(args: ModelArgs) -> float:
    """What cos and sin are multiplied by: YaRN's attention factor, 1 for plain RoPE and for
    latent attention (whose YaRN magnitude goes on the softmax scale instead)."""
    if args.yarn is None or args.latent:
        return 1.0
    return args.yarn.attention_factor


def llama_4_scale(positions: np.ndarray, scaling: Llama4ScalingArgs) -> np.ndarray:
    """1 + β·ln(1 + ⌊pos / original⌋) per position (positions ≥ 0), float64 — for tests and
    docs; each model computes it on its own device from the same formula."""
    steps = np.floor(np.asarray(positions, np.float64) / scaling.original_max_position_embeddings)
    return 1.0 + scaling.beta * np.log1p(steps)
