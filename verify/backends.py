"""How accurately each framework's fp32 matrix product sums, measured where verify runs.

The free-running fp32 gate divides the port's error against the float64 reference by the
reference's own fp32 error against it. Both come mostly from the matrix products' long sums,
and the two backends do not sum alike: on this project's CPU, torch's fp32 matmul (oneDNN /
MKL, blocked) lands 2.6e-7 (RMS) from float64 for K = 4096, XLA's CPU dot 8.1e-7 — 3.1× — so
a faithful 7B port read 2.5–2.9× the reference's own free-running fp32 error, over the 2.0
limit calibrated on tiny configs (whose short sums, K ≤ 128, make the two alike). That is the
port's backend, not the port: the gate's limit is scaled by this factor, measured in the same
run on the model's longest reduction, with products computed as the two models compute them
(`torch.nn.functional.linear` in fp32; `jnp.matmul` at HIGHEST precision,
`model_jax.layers.Linear`). Never below 1: a backend more accurate than the reference's does
not tighten the gate.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import torch
from jax import lax

from checkpoint.args import ModelArgs
from verify.gates import Thresholds

ROWS, COLUMNS = 16, 512  # tokens × outputs of the probe product: a few seconds at K = 28672


def fp32_matmul_factor(k: int, torch_device: str, jax_device) -> float:
    """The port's fp32 matmul error against float64 ÷ the reference's, for sums of length
    `k` of unit-scale random values (fixed seed), at least 1."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((ROWS, k)).astype(np.float32)
    w = (rng.standard_normal((COLUMNS, k)) / np.sqrt(k)).astype(np.float32)
    exact = x.astype(np.float64) @ w.astype(np.float64).T
    with torch.inference_mode():
        ours = torch.nn.functional.linear(
            torch.from_numpy(x).to(torch_device), torch.from_numpy(w).to(torch_device)
        )
    reference = ours.cpu().numpy()
    with jax.default_device(jax_device):
        port = np.asarray(_jax_linear(jnp.asarray(x), jnp.asarray(w)))

    def error(y: np.ndarray) -> float:
        return float(np.sqrt(np.mean((y - exact) ** 2)))

    return max(1.0, error(port) / error(reference)) if error(reference) > 0 else 1.0


@jax.jit
def _jax_linear(x, w):
    return jnp.matmul(x, w.T, precision=lax.Precision.HIGHEST)


def backend_factor(args: ModelArgs, torch_device: str, jax_device) -> tuple[float, int]:
    """How much less accurately the port's backend sums an fp32 matmul than the reference's
    (verify/backends.py), on the model's longest reduction; and that length."""
    reduction = max(args.dim, args.hidden_dim, args.n_heads * (args.v_head_dim or args.head_dim))
    if args.moe is not None and args.moe.expert_hidden_dim:
        reduction = max(reduction, args.moe.expert_hidden_dim)
    return fp32_matmul_factor(reduction, torch_device, jax_device), reduction


def scaled_fp32(t: Thresholds, factor: float) -> Thresholds:
    """The free-running fp32 limit (base and token noise) × the backends' accuracy factor."""
    return dataclasses.replace(
        t,
        free_fp32_ratio=t.free_fp32_ratio * factor,
        fp32_token_noise=t.fp32_token_noise * factor,
    )


def backend_note(factor: float, reduction: int) -> list[str]:
    if factor <= 1.0:
        return []
    return [
        f"fp32 backends: the port's matmul sums {reduction} products {factor:.2f}× less "
        "accurately than the reference's (against float64, verify/backends.py), so the "
        f"free-running fp32 limit is × {factor:.2f} (the thresholds shown include it)"
    ]
