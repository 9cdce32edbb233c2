"""ModelArgs: every params.json version of DESIGN.md §1 parses; bad ones are refused clearly."""

import json

import pytest

from checkpoint.args import ModelArgs, MoeArgs
from checkpoint.errors import CheckpointError

SEVEN_B = {
    "dim": 4096,
    "n_layers": 32,
    "head_dim": 128,
    "hidden_dim": 14336,
    "n_heads": 32,
    "n_kv_heads": 8,
    "norm_eps": 1e-05,
}
VERSIONS = {
    "7b-v0.1": SEVEN_B | {"vocab_size": 32000, "sliding_window": 4096},
    "7b-v0.2": SEVEN_B | {"vocab_size": 32000, "sliding_window": None, "rope_theta": 1e6},
    "7b-v0.3": SEVEN_B | {"vocab_size": 32768, "rope_theta": 1e6},
    "nemo-12b": SEVEN_B | {"dim": 5120, "n_layers": 40, "vocab_size": 131072, "rope_theta": 1e6},
    "mixtral-8x7b": SEVEN_B
    | {"vocab_size": 32000, "rope_theta": 1e6, "moe": {"num_experts": 8, "num_experts_per_tok": 2}},
}


def write_params(tmp_path, params) -> str:
    path = tmp_path / "params.json"
    path.write_text(json.dumps(params))
    return str(path)


@pytest.mark.parametrize("version", VERSIONS)
def test_every_version_parses_and_round_trips(tmp_path, version):
    args = ModelArgs.from_json(write_params(tmp_path, VERSIONS[version]))
    assert ModelArgs.from_dict(args.to_dict()) == args


def test_v01_rope_theta_defaults_to_10000_and_keeps_window(tmp_path):
    args = ModelArgs.from_json(write_params(tmp_path, VERSIONS["7b-v0.1"]))
    assert args.rope_theta == 10000.0
    assert args.sliding_window == 4096


def test_v02_has_no_window_and_theta_1e6(tmp_path):
    args = ModelArgs.from_json(write_params(tmp_path, VERSIONS["7b-v0.2"]))
    assert args.sliding_window is None
    assert args.rope_theta == 1e6


def test_nemo_head_dim_differs_from_dim_over_heads(tmp_path):
    args = ModelArgs.from_json(write_params(tmp_path, VERSIONS["nemo-12b"]))
    assert args.head_dim == 128 != args.dim // args.n_heads


def test_head_dim_defaults_to_dim_over_heads():
    params = {k: v for k, v in VERSIONS["7b-v0.1"].items() if k != "head_dim"}
    assert ModelArgs.from_dict(params).head_dim == 128


def test_moe_is_parsed(tmp_path):
    args = ModelArgs.from_json(write_params(tmp_path, VERSIONS["mixtral-8x7b"]))
    assert args.moe == MoeArgs(num_experts=8, num_experts_per_tok=2)


def test_unknown_keys_are_refused_by_name(tmp_path):
    path = write_params(tmp_path, VERSIONS["7b-v0.1"] | {"use_biases": True, "lora": {}})
    with pytest.raises(CheckpointError, match=r"params.json: unknown key\(s\) lora, use_biases"):
        ModelArgs.from_json(path)


def test_runtime_keys_are_explicitly_ignored():
    assert ModelArgs.from_dict(VERSIONS["7b-v0.1"] | {"max_batch_size": 4}).dim == 4096


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"n_kv_heads": 5}, "n_heads \\(32\\) is not divisible by n_kv_heads \\(5\\)"),
        ({"dim": 0}, "dim must be a positive integer"),
        ({"n_layers": 2.5}, "n_layers must be a positive integer"),
        ({"head_dim": 7}, "head_dim \\(7\\) must be even"),
        ({"norm_eps": -1}, "norm_eps must be a positive number"),
        ({"sliding_window": 0}, "sliding_window must be a positive integer"),
        ({"moe": {"num_experts": 2, "num_experts_per_tok": 3}}, "exceeds moe.num_experts"),
        ({"moe": {"num_experts": 2}}, "moe: .*missing key"),
    ],
    ids=[
        "heads-not-divisible",
        "zero-dim",
        "float-layers",
        "odd-head-dim",
        "negative-eps",
        "zero-window",
        "topk-over-experts",
        "moe-missing-key",
    ],
)
def test_inconsistent_values_are_refused(tmp_path, change, message):
    with pytest.raises(CheckpointError, match=message):
        ModelArgs.from_json(write_params(tmp_path, VERSIONS["7b-v0.1"] | change))


def test_missing_required_key_is_named(tmp_path):
    params = {k: v for k, v in VERSIONS["7b-v0.1"].items() if k != "vocab_size"}
    with pytest.raises(CheckpointError, match="missing key\\(s\\) vocab_size"):
        ModelArgs.from_json(write_params(tmp_path, params))


def test_missing_file_is_named(tmp_path):
    with pytest.raises(CheckpointError, match=r"params.json: file not found"):
        ModelArgs.from_json(tmp_path / "params.json")


def test_invalid_json_is_named(tmp_path):
    (tmp_path / "params.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"params.json: not valid JSON"):
        ModelArgs.from_json(tmp_path / "params.json")
