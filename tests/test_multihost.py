"""Past one host, exercised: two processes joined by `jax.distributed` on this machine, 4 CPU
devices each, one 1x8 mesh across both (tests/multihost_check.py)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from support import tiny_args

import model_jax
from convert.convert import convert_checkpoint

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_share_one_mesh_and_each_reads_only_its_slices(make_checkpoint, tmp_path):
    args = tiny_args(vocab_size=32000, n_heads=8, n_kv_heads=4, head_dim=16)
    converted = tmp_path / "converted"
    convert_checkpoint(make_checkpoint(args), converted)
    env = os.environ | {
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(Path(__file__).parent.parent),
    }
    script, port = Path(__file__).parent / "multihost_check.py", str(free_port())
    outs = [tmp_path / f"process{i}.json" for i in range(2)]
    workers = [
        subprocess.Popen(
            [sys.executable, script, str(i), port, converted, outs[i]],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    logs = [w.communicate(timeout=180)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), "\n".join(logs)[-3000:]

    expected = np.asarray(
        model_jax.load_model(converted, dtype="float32")(
            jnp.array([1, 415, 5565, 302, 9, 77, 1024])
        )
    )
    for out in outs:
        result = json.loads(out.read_text())
        assert (result["global_devices"], result["local_devices"]) == (8, 4)
        logits = np.asarray(result["logits"])
        assert np.abs(logits - expected).max() <= 1e-5 * np.abs(expected).max()
        # Each process read exactly the distinct blocks its own 4 devices hold, no more.
        assert result["read_bytes"] == result["local_block_bytes"] < result["model_bytes"]
        assert result["wq_local_fraction"] == 0.5  # 4 of wq's 8 slices live here
