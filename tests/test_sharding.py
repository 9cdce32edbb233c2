"""Past one device: the model sharded over a mesh of 8 (fake CPU) devices equals the
single-device model, each device holds 1/8 of each sharded weight, and loading reads one
device slice at a time."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import tiny_args

from checkpoint.args import MoeArgs
from convert.convert import convert_checkpoint

pytestmark = pytest.mark.slow  # minutes: `make test-fast` leaves it out

CONFIGS = {
    # GQA (2 kv heads), a hidden_dim 8 does not divide (replicated), a full-attention layer
    # and a windowed one.
    "dense": tiny_args(
        vocab_size=32000,
        n_kv_heads=2,
        n_heads=8,
        head_dim=16,
        hidden_dim=132,
        sliding_window=[None, 8],
    ),
    "moe": tiny_args(
        vocab_size=32000,
        n_kv_heads=4,
        n_heads=8,
        head_dim=16,
        moe=MoeArgs(num_experts=8, num_experts_per_tok=2),
    ),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_sharded_model_matches_single_device(make_checkpoint, tmp_path, name):
    source, out = make_checkpoint(CONFIGS[name]), tmp_path / "converted"
    convert_checkpoint(source, out)
    env = os.environ | {
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
    }
    script = Path(__file__).with_name("sharded_check.py")
    done = subprocess.run(
        [sys.executable, str(script), str(out), "1x8", str(source)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["devices"] == 8
    assert found["logits_rel_error"] <= 1e-5
    assert found["wq_shard_fractions"] == [1 / 8] and found["wq_devices"] == 8
    assert found["reads_exact_slices"]  # every device read exactly its own slice
    assert found["largest_read"] == found["largest_slice"] < found["model_bytes"] / 4
    assert found["generate_equal"] and found["data_parallel_generate_equal"]
    assert found["batch_split_over"] == ["data"]
    assert found["verify"] == "pass"  # mistral-verify --mesh 1x8
