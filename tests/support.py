"""Helpers the tests share: tiny configs, random tokens, error measures."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from checkpoint.args import ModelArgs

# Small enough that every config runs in well under a second on two CPU cores.
BASE = ModelArgs(
    dim=64,
    n_layers=2,
    head_dim=16,
    hidden_dim=128,
    n_heads=4,
    n_kv_heads=2,
    norm_eps=1e-5,
    vocab_size=512,
    sliding_window=None,
    rope_theta=10000.0,
)


def tiny_args(**changes) -> ModelArgs:
    return dataclasses.replace(BASE, **changes)


def relative_error(actual, expected) -> float:
    """max |actual − expected| / max |expected|: error relative to the tensor's scale."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def relative_l2(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def random_tokens(n: int, vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=n, dtype=np.int32)


def hf_rope_parameters(args: ModelArgs, **yarn_keys) -> dict:
    """transformers' `rope_parameters` written out by hand for `args`: default RoPE, or YaRN
    with the keys transformers reads (plus `yarn_keys`, which differ between its models)."""
    if args.yarn is None:
        return {"rope_type": "default", "rope_theta": args.rope_theta}
    return {
        "rope_type": "yarn",
        "rope_theta": args.rope_theta,
        "factor": args.yarn.factor,
        "original_max_position_embeddings": args.yarn.original_max_position_embeddings,
        "beta_fast": args.yarn.beta,
        "beta_slow": args.yarn.alpha,
        **yarn_keys,
    }


def run_on_fake_devices(script: str, *args: str, devices: int = 8) -> dict:
    """Run tests/`script` in a child with `devices` fake CPU devices (XLA's host platform
    device count is fixed at start-up) and return the JSON its last line prints."""
    env = os.environ | {
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "JAX_PLATFORMS": "cpu",
    }
    done = subprocess.run(
        [sys.executable, str(Path(__file__).with_name(script)), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
