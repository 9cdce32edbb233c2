"""ModelArgs: every params.json version of docs/formats.md parses; bad ones are refused clearly."""

import dataclasses
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
    path = write_params(tmp_path, VERSIONS["7b-v0.1"] | {"use_biases": True, "zeta": 1})
    with pytest.raises(CheckpointError, match=r"params.json: unknown key\(s\) use_biases, zeta"):
        ModelArgs.from_json(path)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("lora", {"rank": 16, "scaling": 2.0}),
        ("model_type", "mamba"),
    ],
)
def test_keys_the_reference_reads_but_these_models_do_not_implement_are_refused(
    tmp_path, key, value
):
    path = write_params(tmp_path, VERSIONS["7b-v0.1"] | {key: value})
    with pytest.raises(CheckpointError, match=rf"params.json: .*{key}.* is unsupported"):
        ModelArgs.from_json(path)


def test_runtime_keys_and_the_official_defaults_are_accepted():
    extra = {"max_batch_size": 4, "model_type": "transformer"}
    extra |= {"lora": None, "vision_encoder": None}
    assert ModelArgs.from_dict(VERSIONS["7b-v0.1"] | extra) == ModelArgs.from_dict(
        VERSIONS["7b-v0.1"]
    )


# The 2025–26 sections as their releases write them (docs/formats.md).
MINISTRAL3 = {
    "yarn": {
        "factor": 16,
        "original_max_position_embeddings": 16384,
        "beta": 32,
        "alpha": 1,
        "apply_scale": False,
    },
    "llama_4_scaling": {"original_max_position_embeddings": 16384, "beta": 0.1},
    "max_position_embeddings": 262144,
    "max_seq_len": 262144,
    "tied_embeddings": True,
    "quantization": {"qformat_weight": "fp8_e4m3", "qscheme_act": "TENSOR"},
    "multimodal": {"vision_encoder_args": {"hidden_size": 1024}},
}


def test_the_2025_sections_are_read():
    args = ModelArgs.from_dict(VERSIONS["7b-v0.3"] | MINISTRAL3)
    assert args.yarn.attention_factor == 1.0 and args.yarn.beta == 32
    assert args.llama_4_scaling.beta == 0.1 and args.tied_embeddings
    assert args.quantization.qscheme_act == "TENSOR" and args.has_vision
    assert args.max_position_embeddings == args.max_seq_len == 262144
    with_scale = MINISTRAL3["yarn"] | {"apply_scale": True, "factor": 64}
    assert ModelArgs.from_dict(
        VERSIONS["7b-v0.3"] | {"yarn": with_scale}
    ).yarn.attention_factor == pytest.approx(1.4159, abs=1e-4)  # Medium 3.5's 0.1·ln 64 + 1
    absent = {k: v for k, v in MINISTRAL3["yarn"].items() if k != "apply_scale"}
    assert ModelArgs.from_dict(VERSIONS["7b-v0.3"] | {"yarn": absent}).yarn.apply_scale
    # A vision encoder and FP8 storage describe the same text model as without them.
    assert args.text_only() == dataclasses.replace(args, quantization=None)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"yarn": {"original_max_position_embeddings": 8}}, "yarn: missing key.*factor"),
        (
            {"yarn": {"factor": 4, "original_max_position_embeddings": 8, "gamma": 1}},
            "yarn: unknown key.*gamma",
        ),
        (
            {"yarn": {"factor": 4, "original_max_position_embeddings": 8, "apply_scale": "yes"}},
            "apply_scale must be true or false",
        ),
        (
            {"yarn": {"factor": -4, "original_max_position_embeddings": 8}},
            "factor must be a finite positive",
        ),
        ({"llama_4_scaling": {"beta": 0.1}}, "llama_4_scaling: missing key.*original_max"),
        ({"quantization": {"qformat_weight": "int4"}}, "qformat_weight 'int4' is unsupported"),
        (
            {"quantization": {"qformat_weight": "fp8_e4m3", "qscheme_act": "CHANNEL"}},
            "qscheme_act 'CHANNEL'",
        ),
        (
            {"multimodal": {"whisper_model_args": {"encoder_args": {}}}},
            "whisper_model_args is unsupported .*Voxtral",
        ),
        ({"multimodal": {"audio": {}}}, "multimodal: unknown key 'audio'"),
        ({"tied_embeddings": "yes"}, "tied_embeddings must be true or false"),
        ({"max_position_embeddings": 0}, "max_position_embeddings must be a positive integer"),
    ],
    ids=[
        "yarn-missing-factor",
        "yarn-unknown-key",
        "yarn-apply-scale-not-bool",
        "yarn-negative-factor",
        "llama4-missing-length",
        "quantization-format",
        "quantization-scheme",
        "audio-refused",
        "multimodal-unknown",
        "tied-not-bool",
        "zero-positions",
    ],
)
def test_each_2025_key_is_checked_by_name(tmp_path, change, message):
    with pytest.raises(CheckpointError, match=message):
        ModelArgs.from_json(write_params(tmp_path, VERSIONS["7b-v0.3"] | change))


def test_a_window_list_repeats_over_the_layers():
    # Ministral 8B: a full-context layer, then three 32k-window layers, over 36 layers.
    args = ModelArgs.from_dict(
        SEVEN_B
        | {"n_layers": 36, "vocab_size": 131072}
        | {"sliding_window": [131072, 32768, 32768, 32768]}
    )
    assert args.layer_windows == (131072, 32768, 32768, 32768) * 9
    assert args.window_pattern == (131072, 32768, 32768, 32768)
    assert args.to_dict()["sliding_window"] == [131072, 32768, 32768, 32768]
    assert args.shortest_window == 32768
    with_nulls = ModelArgs.from_dict(SEVEN_B | {"vocab_size": 32000, "sliding_window": [None, 8]})
    assert with_nulls.layer_windows[:4] == (None, 8, None, 8)


def test_equivalent_window_lists_are_one_model():
    base = VERSIONS["7b-v0.1"]
    assert ModelArgs.from_dict(base | {"sliding_window": [4096, 4096]}) == ModelArgs.from_dict(base)
    assert ModelArgs.from_dict(base | {"sliding_window": [None, None]}).sliding_window is None


def test_the_vllm_alias_of_the_window_is_read():
    params = {k: v for k, v in VERSIONS["7b-v0.1"].items() if k != "sliding_window"}
    assert ModelArgs.from_dict(params | {"_sliding_window": 4096}).sliding_window == 4096
    with pytest.raises(ValueError, match="both sliding_window and _sliding_window"):
        ModelArgs.from_dict(VERSIONS["7b-v0.1"] | {"_sliding_window": 1024})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"n_kv_heads": 5}, "n_heads \\(32\\) is not divisible by n_kv_heads \\(5\\)"),
        ({"dim": 0}, "dim must be a positive integer"),
        ({"n_layers": 2.5}, "n_layers must be a positive integer"),
        ({"head_dim": 7}, "head_dim \\(7\\) must be even"),
        ({"norm_eps": -1}, "norm_eps must be a finite positive number"),
        ({"norm_eps": float("nan")}, "norm_eps must be a finite positive number"),
        ({"rope_theta": float("inf")}, "rope_theta must be a finite positive number"),
        ({"sliding_window": 0}, "sliding_window must be a positive integer"),
        ({"sliding_window": [4096, 0]}, "sliding_window entries must be positive ints or null"),
        ({"sliding_window": [8, 8, 8]}, "3 entries, which does not divide n_layers \\(32\\)"),
        ({"sliding_window": []}, "sliding_window must be a positive integer, a list or null"),
        ({"moe": {"num_experts": 2, "num_experts_per_tok": 3}}, "moe: .* exceeds num_experts"),
        ({"moe": {"num_experts": 2}}, "moe: .*missing key"),
    ],
    ids=[
        "heads-not-divisible",
        "zero-dim",
        "float-layers",
        "odd-head-dim",
        "negative-eps",
        "nan-eps",
        "infinite-theta",
        "zero-window",
        "zero-in-window-list",
        "window-list-not-dividing-layers",
        "empty-window-list",
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
