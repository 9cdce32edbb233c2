"""Past one device: the model sharded over a mesh of 8 (fake CPU) devices equals the
single-device model, each device holds 1/8 of each sharded weight, and loading reads one
device slice at a time."""

import pytest
from support import run_on_fake_devices, tiny_args

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
    found = run_on_fake_devices("sharded_check.py", str(out), "1x8", str(source))
    assert found["devices"] == 8
    assert found["logits_rel_error"] <= 1e-5
    assert found["wq_shard_fractions"] == [1 / 8] and found["wq_devices"] == 8
    assert found["reads_exact_slices"]  # every device read exactly its own slice
    assert found["largest_read"] == found["largest_slice"] < found["model_bytes"] / 4
    assert found["generate_equal"] and found["data_parallel_generate_equal"]
    assert found["batch_split_over"] == ["data"]
    assert found["verify"] == "pass"  # mistral-verify --mesh 1x8
    assert found["verify_streamed_head_in_parts"] == "pass"  # … --stream-layers, head in slices
