"""Logit parity between the torch reference and the JAX port, in fp32 and bf16."""

import dataclasses
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import torch

import reference_torch
from model_jax import load_model
from verify import metrics
from verify.gates import BF16_NOISE_RATIO, FP32_REL_L2

DTYPES = {"float32": (torch.float32, jnp.float32), "bfloat16": (torch.bfloat16, jnp.bfloat16)}


@dataclasses.dataclass(frozen=True)
class LogitParity:
    dtype: str
    tokens: int
    rel_l2: float  # port vs reference in the same dtype
    max_abs_logit_diff: float
    top1_agreement: float
    kl_mean: float
    noise_floor: float | None  # bf16 only: reference bf16 vs reference fp32
    noise_ratio: float | None  # bf16 only: (port bf16 vs reference fp32) / noise floor
    passed: bool


def reference_logits(folder: Path, dtype: str, prompts: list[list[int]]) -> np.ndarray:
    model = reference_torch.Transformer.from_folder(folder, dtype=DTYPES[dtype][0])
    return np.concatenate([model(torch.tensor([p]))[0].numpy() for p in prompts])


def port_logits(folder: Path, dtype: str, prompts: list[list[int]]) -> np.ndarray:
    model = load_model(folder, dtype=DTYPES[dtype][1])
    return np.concatenate([np.asarray(model(jnp.asarray(p, jnp.int32))) for p in prompts])


def logit_parity(reference: Path, port: Path, prompts: list[list[int]]) -> list[LogitParity]:
    """fp32 and bf16 rows: the reference runs `reference`, the port runs `port`."""
    ref = {d: reference_logits(reference, d, prompts) for d in DTYPES}
    rows = []
    for dtype in DTYPES:
        out = port_logits(port, dtype, prompts)
        floor = ratio = None
        rel = metrics.relative_l2(out, ref[dtype])
        if dtype == "float32":
            passed = rel <= FP32_REL_L2
        else:
            floor = metrics.relative_l2(ref["bfloat16"], ref["float32"])
            ratio = metrics.relative_l2(out, ref["float32"]) / floor
            passed = ratio <= BF16_NOISE_RATIO
        rows.append(
            LogitParity(
                dtype=dtype,
                tokens=len(out),
                rel_l2=rel,
                max_abs_logit_diff=metrics.max_abs_diff(out, ref[dtype]),
                top1_agreement=metrics.top1_agreement(out, ref[dtype]),
                kl_mean=float(metrics.kl_divergence(ref[dtype], out).mean()),
                noise_floor=floor,
                noise_ratio=ratio,
                passed=passed,
            )
        )
    return rows
