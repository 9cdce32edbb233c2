"""mistral-convert on the 2025–26 dense releases as downloaded, at tiny size:

- a Mistral-Small-3.1-like folder: `vision_encoder` beside the text decoder (vision tensors
  carried byte for byte), tekken (vocab 131072), head_dim ≠ dim / n_heads;
- a Ministral-3-like folder: FP8 linears (scales of shape [], [1] and one per row, activation
  and fake-quantizer scales), yarn, llama_4_scaling, tied embeddings, `multimodal` vision.

Each converts with `--dtype keep` (every byte), `--dtype bfloat16` (FP8 dequantized) and
`--text-only`; `--check` passes; the HF export loads in transformers and computes what a
Ministral3ForCausalLM built by hand computes; bad input is refused in one line.
"""

import dataclasses
import json
import math

import ml_dtypes
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from support import random_tokens, relative_error, tiny_args

import reference_torch
from checkpoint.folder import INDEX_NAME, open_folder
from checkpoint.safetensors_file import read_safetensors_table
from checkpoint.sections import Llama4ScalingArgs, QuantizationArgs, YarnArgs
from checkpoint.tiny import (
    TINY_VISION_ENCODER,
    quantize_fp8,
    random_state_dict,
    vision_state,
    write_tiny_checkpoint,
)
from convert import fp8, stream
from convert.check import check_converted
from convert.cli import main as convert_cli
from convert.convert import convert_checkpoint
from convert.plan import WHY_DEQUANTIZED, WHY_HF_TEXT, WHY_TEXT_ONLY

SMALL_31 = tiny_args(
    vocab_size=131072,
    head_dim=24,  # ≠ 64 / 4
    rope_theta=1e9,
    max_position_embeddings=131072,
    vision_encoder=TINY_VISION_ENCODER,
)
# Ministral 3's sections at a tiny length, so the 20-token prompts cross the original length
# (yarn's ramp and llama-4's floor(pos / 8) both act).
YARN = YarnArgs(
    factor=4.0, original_max_position_embeddings=8, beta=32.0, alpha=1.0, apply_scale=False
)
MINISTRAL_3 = tiny_args(
    vocab_size=131072,
    rope_theta=1e6,
    max_position_embeddings=32,
    yarn=YARN,
    llama_4_scaling=Llama4ScalingArgs(original_max_position_embeddings=8, beta=0.1),
    tied_embeddings=True,
    quantization=QuantizationArgs(qformat_weight="fp8_e4m3", qscheme_act="TENSOR"),
    multimodal={"vision_encoder_args": TINY_VISION_ENCODER},
)
LINEARS = (
    "attention.wq",
    "attention.wk",
    "attention.wv",
    "attention.wo",
    "feed_forward.w1",
    "feed_forward.w2",
    "feed_forward.w3",
)
L4_16 = {"original_max_position_embeddings": 16}
FAKE_QUANTIZERS = [f"layers.{i}.attention.kv_fake_quantizer.qscale_act" for i in range(2)]


def ministral3_state(args, seed=0) -> dict[str, torch.Tensor]:
    """Every text linear FP8: layer 0's attention with 0-d scales, layer 1's wq with one scale
    per row, the rest with [1]; activation and KV fake-quantizer scales; vision tensors."""
    state = random_state_dict(args, seed=seed)
    names = [f"layers.{i}.{w}.weight" for i in range(args.n_layers) for w in LINEARS]
    scalar = names[:4]
    per_row = ["layers.1.attention.wq.weight"]
    state = quantize_fp8(state, scalar, scalar=True)
    state = quantize_fp8(state, per_row, per_row=True)
    state = quantize_fp8(state, [n for n in names if n not in scalar + per_row])
    state |= {name: torch.tensor([0.02]) for name in FAKE_QUANTIZERS}
    return state | vision_state(args, seed=seed)


@pytest.fixture(scope="module")
def small31(tmp_path_factory):
    folder = tmp_path_factory.mktemp("small31") / "src"
    state = random_state_dict(SMALL_31, seed=1) | vision_state(SMALL_31, seed=1)
    return write_tiny_checkpoint(folder, SMALL_31, state=state, weights_format="safetensors")


@pytest.fixture(scope="module")
def ministral3(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ministral3") / "src"
    return write_tiny_checkpoint(
        folder,
        MINISTRAL_3,
        state=ministral3_state(MINISTRAL_3),
        weights_format="split-safetensors",
    )


def tensors_of(folder):
    return open_folder(folder).tensors


def manifest_of(folder) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def params_of(folder) -> dict:
    return json.loads((folder / "params.json").read_text())


def check_passes(folder) -> None:
    assert check_converted(folder) == []
    result = CliRunner().invoke(convert_cli, ["--check", str(folder)])
    assert result.exit_code == 0, result.output


def raw_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().view(torch.uint8).numpy().tobytes()


def torch_state(folder) -> dict[str, torch.Tensor]:
    """The source's tensors as torch's own reader has them."""
    from safetensors.torch import load_file

    state = {}
    for path in sorted(folder.glob("consolidated*.safetensors")):
        state |= load_file(path)
    return state


# ---------------------------------------------------------------------------------------------
# Mistral Small 3.1 layout: vision carried


@pytest.mark.slow
def test_small31_keep_copies_text_and_vision_byte_for_byte(small31, tmp_path):
    out = tmp_path / "out"
    summary = convert_checkpoint(small31, out, max_shard_size="4MB")
    ours, theirs = tensors_of(out), tensors_of(small31)
    vision = [n for n in theirs if n.startswith(("vision_", "patch_", "pre_mm_"))]
    assert len(vision) == 8 and list(ours) == list(theirs)  # text in spec order, then vision
    for name, record in theirs.items():
        assert ours[name].dtype == record.dtype, name
        assert ours[name].array().tobytes() == record.array().tobytes(), name
    index = json.loads((out / INDEX_NAME).read_text())
    assert set(vision) <= set(index["weight_map"]) and summary.shards > 1
    assert (out / "params.json").read_bytes() == (small31 / "params.json").read_bytes()
    assert (out / "tekken.json").read_bytes() == (small31 / "tekken.json").read_bytes()
    contents = manifest_of(out)["contents"]
    assert contents["carried"]["tensors"] == vision
    assert contents["left_out"] == [] and summary.carried == 8
    assert open_folder(out).roles.carried == tuple(vision)
    check_passes(out)


@pytest.mark.slow
def test_small31_vision_stays_byte_exact_whatever_the_dtype(small31, tmp_path):
    out = tmp_path / "out"
    convert_checkpoint(small31, out, dtype="float32")
    ours, theirs = tensors_of(out), tensors_of(small31)
    for name, record in theirs.items():
        if name in open_folder(small31).roles.carried:
            assert ours[name].dtype == "BF16"
            assert ours[name].array().tobytes() == record.array().tobytes()
        else:
            assert ours[name].dtype == "F32"
            np.testing.assert_array_equal(ours[name].array(), record.array().astype(np.float32))
    assert (out / "params.json").read_bytes() == (small31 / "params.json").read_bytes()
    check_passes(out)


@pytest.mark.slow
def test_small31_text_only_leaves_the_vision_encoder_out_and_says_so(small31, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(convert_cli, [str(small31), str(out), "--text-only"])
    assert result.exit_code == 0, result.output
    assert f"left out 8 tensor(s): {WHY_TEXT_ONLY}" in result.output
    ours, theirs = tensors_of(out), tensors_of(small31)
    text = [n for n in theirs if not n.startswith(("vision_", "patch_", "pre_mm_"))]
    assert list(ours) == text
    source_params = params_of(small31)
    expected = {k: v for k, v in source_params.items() if k != "vision_encoder"}
    assert list(params_of(out).items()) == list(expected.items())  # same keys, same order
    contents = manifest_of(out)["contents"]
    assert contents["left_out"] == [
        {"tensors": [n for n in theirs if n not in text], "why": WHY_TEXT_ONLY}
    ]
    assert contents["params"]["removed_keys"] == ["vision_encoder"]
    check_passes(out)
    tokens = torch.from_numpy(random_tokens(12, SMALL_31.vocab_size)).long()[None]
    ref = reference_torch.Transformer.from_folder(small31, dtype=torch.float32)(tokens)
    assert torch.equal(
        ref, reference_torch.Transformer.from_folder(out, dtype=torch.float32)(tokens)
    )


@pytest.mark.slow
def test_small31_hf_export_is_the_text_model(small31, tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = tmp_path / "hf"
    summary = convert_checkpoint(small31, hf, layout="hf")
    config = json.loads((hf / "config.json").read_text())
    assert config["model_type"] == "mistral" and config["head_dim"] == 24
    assert config["max_position_embeddings"] == 131072 and config["tie_word_embeddings"] is False
    names = json.loads((hf / INDEX_NAME).read_text())["weight_map"]
    assert not [n for n in names if "vision" in n or "patch_merger" in n or "mm_" in n]
    contents = manifest_of(hf)["contents"]
    assert contents["left_out"][0]["why"] == WHY_HF_TEXT and summary.left_out[0][1] == 8
    assert "vision_encoder" in contents["params"]["not_exported"]
    check_passes(hf)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    tokens = torch.from_numpy(random_tokens(20, SMALL_31.vocab_size)).long()[None]
    with torch.no_grad():
        theirs = model(tokens).logits[0].numpy()
    ours = reference_torch.Transformer.from_folder(small31, dtype=torch.float32)(tokens)[0]
    assert relative_error(theirs, ours.numpy()) <= 1e-5


@pytest.mark.slow
def test_small31_text_round_trip_through_hf_keeps_max_position_embeddings(
    make_checkpoint, tmp_path
):
    text = dataclasses.replace(SMALL_31, vision_encoder=None)
    source = make_checkpoint(text, seed=4, weights_format="safetensors")
    convert_checkpoint(source, tmp_path / "hf", layout="hf")
    convert_checkpoint(tmp_path / "hf", tmp_path / "back")
    ours, theirs = tensors_of(tmp_path / "back"), tensors_of(source)
    assert list(ours) == list(theirs)
    for name, record in theirs.items():
        assert ours[name].array().tobytes() == record.array().tobytes(), name
    assert params_of(tmp_path / "back") == params_of(source)
    assert params_of(source)["max_position_embeddings"] == 131072
    # A folder without one gets the export's default (32768), which maps back to none.
    plain = make_checkpoint(tiny_args(vocab_size=32000), weights_format="safetensors")
    convert_checkpoint(plain, tmp_path / "hf-plain", layout="hf")
    assert (
        json.loads((tmp_path / "hf-plain" / "config.json").read_text())["max_position_embeddings"]
        == 32768
    )
    convert_checkpoint(tmp_path / "hf-plain", tmp_path / "back-plain")
    assert "max_position_embeddings" not in params_of(tmp_path / "back-plain")


# ---------------------------------------------------------------------------------------------
# Ministral 3 layout: FP8, yarn, llama-4 scaling, tied embeddings, vision


@pytest.mark.slow
def test_ministral3_keep_copies_every_byte_fp8_and_scales_included(ministral3, tmp_path):
    out = tmp_path / "out"
    convert_checkpoint(ministral3, out, max_shard_size="2MB")
    ours, theirs = tensors_of(out), tensors_of(ministral3)
    assert list(ours) == list(theirs) and "output.weight" not in ours  # tied: none invented
    for name, record in theirs.items():
        assert ours[name].dtype == record.dtype, name
        assert ours[name].array().tobytes() == record.array().tobytes(), name
    roles = open_folder(out).roles
    assert len(roles.quantized) == 14 and all(ours[w].dtype == "F8_E4M3" for w in roles.quantized)
    shapes = {ours[s].shape for s in roles.weight_scales}
    assert shapes == {(), (1,), (64,)}  # 0-d, one element, one per row of wq
    assert roles.unused == tuple(FAKE_QUANTIZERS) and len(roles.carried) == 8
    assert (out / "params.json").read_bytes() == (ministral3 / "params.json").read_bytes()
    contents = manifest_of(out)["contents"]
    assert contents["carried"]["tensors"] == list(roles.carried)
    assert contents["unused"]["tensors"] == FAKE_QUANTIZERS
    assert set(contents["fp8_kept"]["tensors"]) == {
        *roles.quantized,
        *roles.weight_scales,
        *roles.activation_scales,
    }
    assert all(ours[w].nbytes == math.prod(ours[w].shape) for w in roles.quantized)  # 1 B each
    check_passes(out)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_ministral3_dequantized_equals_fp8_times_scale(ministral3, tmp_path, dtype):
    out = tmp_path / "out"
    result = CliRunner().invoke(convert_cli, [str(ministral3), str(out), "--dtype", dtype])
    assert result.exit_code == 0, result.output
    assert "dequantized 14 FP8 weight(s)" in result.output
    source, roles = torch_state(ministral3), open_folder(ministral3).roles
    ours = tensors_of(out)
    target = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    for scale, weight in roles.weight_scales.items():
        expected = (source[weight].float() * source[scale].float().reshape(-1, 1)).to(target)
        assert ours[weight].dtype == {"bfloat16": "BF16", "float32": "F32"}[dtype]
        assert ours[weight].array().tobytes() == raw_bytes(expected), weight
    gone = {*roles.weight_scales, *roles.activation_scales, *roles.unused}
    assert not gone & set(ours) and len(gone) == 30
    for name in roles.carried:  # whatever --dtype is
        assert ours[name].array().tobytes() == tensors_of(ministral3)[name].array().tobytes()
    source_params = params_of(ministral3)
    expected = {k: v for k, v in source_params.items() if k != "quantization"}
    assert list(params_of(out).items()) == list(expected.items())
    contents = manifest_of(out)["contents"]
    assert sorted(contents["dequantized"]["tensors"]) == sorted(roles.quantized)
    assert contents["dequantized"]["to"] == {"bfloat16": "BF16", "float32": "F32"}[dtype]
    assert {n for g in contents["left_out"] for n in g["tensors"]} == gone
    assert contents["left_out"][0]["why"] == WHY_DEQUANTIZED
    assert contents["params"]["removed_keys"] == ["quantization"]
    check_passes(out)


@pytest.mark.slow
def test_ministral3_text_only_keeps_fp8_and_drops_multimodal(ministral3, tmp_path):
    out = tmp_path / "out"
    convert_checkpoint(ministral3, out, text_only=True)
    ours, roles = tensors_of(out), open_folder(ministral3).roles
    assert not set(roles.carried) & set(ours)
    assert all(ours[w].dtype == "F8_E4M3" for w in roles.quantized)
    params = params_of(out)
    assert "multimodal" not in params and params["quantization"]["qformat_weight"] == "fp8_e4m3"
    check_passes(out)


@pytest.mark.slow
def test_check_compares_the_manifests_account_with_the_folder(ministral3, tmp_path):
    out = tmp_path / "out"
    convert_checkpoint(ministral3, out)
    manifest = manifest_of(out)
    unlisted = manifest["contents"]["carried"]["tensors"].pop()
    manifest["contents"]["unused"]["tensors"].append("layers.9.attention.k_fake_quantizer")
    (out / "manifest.json").write_text(json.dumps(manifest))
    problems = check_converted(out)
    assert f"tensor {unlisted} is carried in the folder but not listed in the manifest" in (
        "\n".join(problems)
    )
    assert any("layers.9.attention.k_fake_quantizer is listed as unused" in p for p in problems)


def test_cli_json_summary_counts_what_was_carried_dequantized_and_left_out(ministral3, tmp_path):
    args = [str(ministral3), str(tmp_path / "out"), "--dtype", "bfloat16", "--json"]
    result = CliRunner().invoke(convert_cli, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["carried"] == 8 and summary["dequantized"] == 14
    assert summary["left_out"] == [[WHY_DEQUANTIZED, 30]]


def permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """HF `convert_mistral_weights_to_hf.py`: interleaved pairs → rotate_half halves."""
    out, dim = w.shape
    return w.view(heads, out // heads // 2, 2, dim).transpose(1, 2).reshape(out, dim)


HF_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}


def hand_built_ministral3(args, source: dict[str, torch.Tensor], rope: dict):
    """transformers' Ministral3ForCausalLM built from a config written out here (the keys
    `_compute_yarn_parameters` and `Ministral3Attention` read), with the source's weights:
    FP8 dequantized as float32(fp8) × scale → bf16, wq/wk permuted, tied head."""
    transformers = pytest.importorskip("transformers")
    config = transformers.Ministral3Config(
        vocab_size=args.vocab_size,
        hidden_size=args.dim,
        intermediate_size=args.hidden_dim,
        num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads,
        num_key_value_heads=args.n_kv_heads,
        head_dim=args.head_dim,
        rms_norm_eps=args.norm_eps,
        max_position_embeddings=args.max_position_embeddings,
        tie_word_embeddings=args.tied_embeddings,
        sliding_window=args.sliding_window,
        rope_parameters=rope,
    )
    model = transformers.Ministral3ForCausalLM(config).eval()
    top = {
        "tok_embeddings.weight": "model.embed_tokens.weight",
        "norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    }
    state = {}
    for name, tensor in source.items():
        if name not in top and not (name.startswith("layers.") and name.endswith(".weight")):
            continue  # scales, fake quantizers, vision
        base = name.removesuffix(".weight")
        if f"{base}.qscale_weight" in source:
            scale = source[f"{base}.qscale_weight"].float().reshape(-1, 1)
            tensor = (tensor.float() * scale).to(torch.bfloat16)
        tensor = tensor.float()
        if name.endswith("attention.wq.weight"):
            tensor = permute(tensor, args.n_heads)
        elif name.endswith("attention.wk.weight"):
            tensor = permute(tensor, args.n_kv_heads)
        if name in top:
            state[top[name]] = tensor
        else:
            _, layer, rest = name.split(".", 2)
            state[f"model.layers.{layer}.{HF_NAMES[rest]}"] = tensor
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    if args.tied_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model


def rope_by_hand(args) -> dict:
    """What the brief says the export writes, from the params.json sections."""
    scaling = args.llama_4_scaling
    if args.yarn is None:
        return {
            "rope_type": "default",
            "rope_theta": args.rope_theta,
            "original_max_position_embeddings": scaling.original_max_position_embeddings,
            "llama_4_scaling_beta": scaling.beta,
        }
    factor = args.yarn.factor
    return {
        "rope_type": "yarn",
        "rope_theta": args.rope_theta,
        "factor": factor,
        "original_max_position_embeddings": args.yarn.original_max_position_embeddings,
        "beta_fast": args.yarn.beta,
        "beta_slow": args.yarn.alpha,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "attention_factor": 0.1 * math.log(factor) + 1 if args.yarn.apply_scale else 1.0,
        "llama_4_scaling_beta": scaling.beta if scaling else 0.0,
    }


VARIANTS = {
    "ministral3": MINISTRAL_3,
    "yarn-apply-scale-untied": dataclasses.replace(
        MINISTRAL_3,
        yarn=dataclasses.replace(YARN, apply_scale=True, beta=16.0, alpha=2.0),
        llama_4_scaling=None,
        tied_embeddings=False,
        sliding_window=12,
    ),
    "llama4-only": dataclasses.replace(
        MINISTRAL_3,
        yarn=None,
        llama_4_scaling=Llama4ScalingArgs(original_max_position_embeddings=4, beta=0.5),
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_ministral3_hf_export_matches_a_hand_built_ministral3(ministral3, tmp_path, variant):
    transformers = pytest.importorskip("transformers")
    args = VARIANTS[variant]
    if args == MINISTRAL_3:
        source = ministral3
    else:
        source = write_tiny_checkpoint(
            tmp_path / "src",
            args,
            state=ministral3_state(args, seed=2),
            weights_format="safetensors",
        )
    hf = tmp_path / "hf"
    summary = convert_checkpoint(source, hf, layout="hf")
    config = json.loads((hf / "config.json").read_text())
    assert config["model_type"] == "ministral3"
    assert config["architectures"] == ["Ministral3ForCausalLM"]
    assert config["rope_parameters"] == rope_by_hand(args)
    assert config["max_position_embeddings"] == 32
    assert config["tie_word_embeddings"] is args.tied_embeddings
    assert config["sliding_window"] == args.sliding_window
    weights = read_safetensors_table(next(hf.glob("model-*.safetensors")))
    assert ("lm_head.weight" in weights) is not args.tied_embeddings
    assert not [n for n in weights if "qscale" in n or "vision" in n or "quantizer" in n]
    assert weights["model.layers.0.self_attn.q_proj.weight"].dtype == "BF16"
    contents = manifest_of(hf)["contents"]
    assert len(contents["dequantized"]["tensors"]) == 14 and summary.dequantized == 14
    assert {g["why"] for g in contents["left_out"]} == {WHY_HF_TEXT, WHY_DEQUANTIZED}
    assert set(contents["params"]["not_exported"]) == {"quantization", "multimodal"}
    check_passes(hf)

    model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    assert type(model).__name__ == "Ministral3ForCausalLM"
    by_hand = hand_built_ministral3(args, torch_state(source), rope_by_hand(args))
    tokens = torch.from_numpy(random_tokens(20, args.vocab_size)).long()[None]
    with torch.no_grad():
        theirs, ours = model(tokens).logits[0], by_hand(tokens).logits[0]
    assert relative_error(theirs.numpy(), ours.numpy()) <= 1e-6
    # The sections do act within these 20 positions: without them the logits differ.
    plain = {"rope_type": "default", "rope_theta": args.rope_theta, "llama_4_scaling_beta": 0.0}
    plain |= {"original_max_position_embeddings": 8}
    without = hand_built_ministral3(args, torch_state(source), plain)
    with torch.no_grad():
        assert relative_error(without(tokens).logits[0].numpy(), ours.numpy()) > 1e-3


BF16_MINISTRAL_3 = dataclasses.replace(MINISTRAL_3, quantization=None, multimodal=None)


@pytest.mark.slow
def test_ministral3_round_trip_through_hf_is_byte_identical(make_checkpoint, tmp_path):
    source = make_checkpoint(BF16_MINISTRAL_3, seed=5, weights_format="safetensors")
    convert_checkpoint(source, tmp_path / "hf", layout="hf")
    convert_checkpoint(tmp_path / "hf", tmp_path / "back")
    ours, theirs = tensors_of(tmp_path / "back"), tensors_of(source)
    assert list(ours) == list(theirs) and "output.weight" not in ours
    for name, record in theirs.items():
        assert ours[name].array().tobytes() == record.array().tobytes(), name
    assert params_of(tmp_path / "back") == params_of(source)
    check_passes(tmp_path / "back")


def test_a_ministral3_saved_by_transformers_maps_back(tmp_path):
    """transformers' own Ministral3 config (its defaults: yarn with mscale = mscale_all_dim = 1,
    llama_4_scaling_beta 0.1, both `type` and `rope_type`) → params.json's sections."""
    transformers = pytest.importorskip("transformers")
    config = transformers.Ministral3Config(
        vocab_size=32000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = transformers.Ministral3ForCausalLM(config).eval()
    model.save_pretrained(tmp_path / "hf")
    from checkpoint.tiny import copy_tokenizer

    copy_tokenizer(tmp_path / "hf", 32000)
    convert_checkpoint(tmp_path / "hf", tmp_path / "out")
    params = params_of(tmp_path / "out")
    assert params["yarn"] == {
        "factor": 16.0,
        "original_max_position_embeddings": 16384,
        "beta": 32.0,
        "alpha": 1.0,
        "apply_scale": False,  # attention factor 1: mscale / mscale_all_dim
    }
    assert params["llama_4_scaling"] == {"original_max_position_embeddings": 16384, "beta": 0.1}
    assert params["tied_embeddings"] is True and params["max_position_embeddings"] == 262144
    assert "output.weight" not in tensors_of(tmp_path / "out")
    check_passes(tmp_path / "out")
    convert_checkpoint(tmp_path / "out", tmp_path / "again", layout="hf")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "again").eval()
    tokens = torch.from_numpy(random_tokens(20, 32000)).long()[None]
    with torch.no_grad():
        assert torch.equal(again(tokens).logits, model(tokens).logits)


# ---------------------------------------------------------------------------------------------
# FP8 arithmetic


@pytest.mark.parametrize("by_bits", [True, False], ids=["bits", "table"])
def test_fp8_decoding_is_exact_for_every_byte(monkeypatch, by_bits):
    assert fp8.subnormals_work()
    if not by_bits:  # as where the thread flushes subnormal float32s to zero (DAZ)
        monkeypatch.setattr(fp8, "subnormals_work", lambda: False)
    raw = np.arange(256, dtype=np.uint8)
    values = raw.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    finite = (raw & 0x7F) != 0x7F
    assert finite.sum() == 254
    one = fp8.WeightScale(np.float32(1.0))
    ours = fp8.dequantize(raw[finite].reshape(2, 127), one, _record((2, 127)))
    assert ours.tobytes() == values[finite].tobytes()  # bit for bit, ±0 and subnormals too
    assert fp8.first_nan(raw) == 0x7F
    assert fp8.first_nan(np.array([0xFF, 0], np.uint8)) == 0
    assert fp8.first_nan(raw[finite]) is None
    assert fp8.first_nan(np.zeros(3 * fp8.BLOCK + 5, np.uint8)) is None


def _record(shape):
    from checkpoint.tensors import TensorRecord

    return TensorRecord("w", "src", "F8_E4M3", shape, 0)


@pytest.mark.parametrize("scale_shape", [(), (1,), (300,)])
def test_dequantize_matches_torch_per_tensor_and_per_row(scale_shape):
    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(300, 1000, generator=gen) * 100).to(torch.float8_e4m3fn)
    scale = torch.rand(scale_shape, generator=gen) + 1e-3
    expected = (weight.float() * scale.float().reshape(-1, 1)).to(torch.bfloat16)
    raw = weight.view(torch.uint8).numpy()
    out = np.empty(raw.shape, ml_dtypes.bfloat16)
    rows = fp8.WeightScale(scale.numpy()).rows(0, 300, (300, 1000))
    fp8.dequantize_into(raw, rows, out, _record((300, 1000)))
    assert out.view(np.uint16).tobytes() == expected.view(torch.int16).numpy().tobytes()


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing at OUT


def convert_fails(src, out, *extra, expect: str) -> str:
    result = CliRunner().invoke(convert_cli, [str(src), str(out), *extra])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert expect in lines[0], lines[0]
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if ".partial-" in p.name]
    return lines[0]


def broken(tmp_path, args=MINISTRAL_3, edit=None, params=None):
    state = ministral3_state(args)
    if edit:
        edit(state)
    folder = write_tiny_checkpoint(
        tmp_path / "src", args, state=state, weights_format="safetensors"
    )
    if params:
        path = folder / "params.json"
        path.write_text(json.dumps(params(json.loads(path.read_text()))))
    return folder


def poke(folder, name: str, index: int, byte: int) -> None:
    """Overwrite one byte of tensor `name` in the folder's weights file."""
    path = folder / "consolidated.safetensors"
    record = read_safetensors_table(path)[name]
    data = bytearray(path.read_bytes())
    data[record.offset + index] = byte
    path.write_bytes(bytes(data))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["keep", "bfloat16"])
@pytest.mark.parametrize("byte", [0x7F, 0xFF])
def test_nan_fp8_bytes_are_refused_naming_the_tensor(tmp_path, dtype, byte):
    folder = broken(tmp_path)
    poke(folder, "layers.1.feed_forward.w2.weight", 128 * 3 + 7, byte)
    message = convert_fails(
        folder, tmp_path / "out", "--dtype", dtype, expect="layers.1.feed_forward.w2.weight"
    )
    assert "holds NaN: its FP8 byte at [3, 7] is 0x7F or 0xFF" in message


@pytest.mark.slow
@pytest.mark.parametrize("kernel_copy", [True, False], ids=["copy_file_range", "buffered"])
def test_the_keep_mode_nan_check_sees_every_chunk(tmp_path, monkeypatch, kernel_copy):
    folder = broken(tmp_path)
    poke(folder, "layers.0.feed_forward.w1.weight", 128 * 64 - 1, 0x7F)  # the last byte
    monkeypatch.setattr(stream, "CHUNK_BYTES", 1000)  # many chunks per tensor
    if not kernel_copy:
        monkeypatch.delattr(stream.os, "copy_file_range")
    message = convert_fails(folder, tmp_path / "out", expect="layers.0.feed_forward.w1.weight")
    assert "at [127, 63]" in message


@pytest.mark.slow
@pytest.mark.parametrize(
    ("edit", "dtype", "expect"),
    [
        (
            lambda s: s.update({"layers.0.attention.wq.qscale_weight": torch.tensor(math.inf)}),
            "bfloat16",
            "tensor layers.0.attention.wq.qscale_weight (the scale of "
            "layers.0.attention.wq.weight) is not finite (inf)",
        ),
        (
            lambda s: s.update(
                {"layers.1.attention.wq.qscale_weight": torch.full((64,), math.nan)}
            ),
            "keep",
            "tensor layers.1.attention.wq.qscale_weight (the scale of "
            "layers.1.attention.wq.weight) is not finite (nan)",
        ),
        (
            lambda s: s.update({"layers.0.feed_forward.w1.qscale_act": torch.tensor([math.nan])}),
            "keep",
            "tensor layers.0.feed_forward.w1.qscale_act is not finite",
        ),
        (
            lambda s: s.update({FAKE_QUANTIZERS[1]: torch.tensor([-math.inf])}),
            "keep",
            f"tensor {FAKE_QUANTIZERS[1]} is not finite",
        ),
        (
            lambda s: s.pop("layers.1.feed_forward.w3.qscale_weight"),
            "keep",
            "tensor layers.1.feed_forward.w3.weight is FP8 without its qscale_weight",
        ),
        (
            lambda s: s.update({"layers.0.feed_forward.w2.qscale_weight": torch.ones(2, 2)}),
            "keep",
            "tensor layers.0.feed_forward.w2.qscale_weight has shape [2, 2], expected [] or [1]"
            " or [64]",
        ),
        (
            lambda s: s.update({"layers.0.feed_forward.w2.qscale_weight": torch.ones(128)}),
            "bfloat16",
            "has shape [128], expected [] or [1] or [64]",
        ),
        (
            lambda s: s.update({"layers.0.attention.wo.qscale_act": torch.ones(64)}),
            "keep",
            "tensor layers.0.attention.wo.qscale_act has shape [64], expected [] or [1]",
        ),
        (
            lambda s: s.update({"layers.0.attention.wq.qscale_weight": torch.tensor(1e37)}),
            "float16",
            "tensor layers.0.attention.wq.weight × its scale overflows F16",
        ),
    ],
    ids=[
        "inf-scale",
        "nan-per-row-scale",
        "nan-activation-scale",
        "inf-fake-quantizer-scale",
        "missing-scale",
        "2d-scale",
        "scale-of-wrong-length",
        "activation-scale-per-row",
        "overflow",
    ],
)
def test_bad_scales_are_refused_naming_the_tensor(tmp_path, edit, dtype, expect):
    folder = broken(tmp_path, edit=edit)
    convert_fails(folder, tmp_path / "out", "--dtype", dtype, expect=expect)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("params", "extra", "expect"),
    [
        (
            lambda p: p | {"multimodal": {"whisper_model_args": {"encoder_args": {"dim": 8}}}},
            [],
            "multimodal.whisper_model_args is unsupported (an audio encoder (Voxtral))",
        ),
        (
            lambda p: p | {"multimodal": {"vision_encoder_args": {}, "audio": {}}},
            [],
            "multimodal: unknown key 'audio'",
        ),
        (
            lambda p: p | {"quantization": p["quantization"] | {"block_size": 128}},
            [],
            "quantization: unknown key(s) block_size",
        ),
        (
            lambda p: p | {"quantization": {"qformat_weight": "nvfp4"}},
            [],
            "qformat_weight 'nvfp4' is unsupported",
        ),
        (
            lambda p: p | {"quantization": p["quantization"] | {"qscheme_act": "TOKEN"}},
            [],
            "qscheme_act 'TOKEN' is unsupported",
        ),
        (
            lambda p: p | {"yarn": p["yarn"] | {"mscale": 1.0}},
            [],
            "yarn: unknown key(s) mscale",
        ),
        (
            lambda p: (
                p | {"llama_4_scaling": {"original_max_position_embeddings": 16, "beta": 0.1}}
            ),
            ["--format", "hf"],
            "params.json: --format hf: transformers cannot express this llama_4_scaling",
        ),
        (
            lambda p: p | {"sliding_window": [None, 8]},
            ["--format", "hf"],
            "params.json: --format hf: transformers cannot express these per-layer windows",
        ),
    ],
    ids=[
        "whisper",
        "multimodal-unknown",
        "quantization-unknown-key",
        "quantization-format",
        "quantization-scheme",
        "yarn-unknown-key",
        "llama4-length-differs-for-hf",
        "windows-with-yarn-for-hf",
    ],
)
def test_bad_params_are_refused_by_name(tmp_path, params, extra, expect):
    folder = broken(tmp_path, params=params)
    convert_fails(folder, tmp_path / "out", *extra, expect=expect)


def test_fp8_scales_without_quantization_in_params_are_refused(tmp_path):
    def no_fake_quantizers(state):
        for name in FAKE_QUANTIZERS:
            del state[name]

    folder = broken(
        tmp_path,
        edit=no_fake_quantizers,
        params=lambda p: {k: v for k, v in p.items() if k != "quantization"},
    )
    expect = "FP8 weights (qscale_weight) but no quantization in params.json"
    convert_fails(folder, tmp_path / "out", expect=expect)


def test_text_only_cannot_be_given_to_check(ministral3):
    result = CliRunner().invoke(convert_cli, ["--check", str(ministral3), "--text-only"])
    assert result.exit_code == 2 and "--text-only cannot be used with --check" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    ("edit", "expect"),
    [
        (lambda r: r | {"attention_factor": 1.5}, "attention factor 1.5 is neither 1 nor"),
        (lambda r: r | {"truncate": False}, "rope_parameters truncate False is not supported"),
        (lambda r: r | {"rope_type": "llama3"}, "rope_type 'llama3' is not supported"),
        (lambda r: r | {"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5 is not supp"),
        (lambda r: r | {"short_factor": [1.0]}, "unsupported key(s) for yarn: short_factor"),
        (
            lambda r: {k: v for k, v in r.items() if k != "llama_4_scaling_beta"},
            "rope_parameters has no llama_4_scaling_beta",
        ),
        (lambda r: None, "ministral3 needs rope_parameters"),
    ],
    ids=["attention-factor", "no-truncate", "llama3", "partial", "unknown", "no-beta", "none"],
)
def test_hf_ministral3_configs_not_mapped_are_refused_by_name(
    make_checkpoint, tmp_path, edit, expect
):
    hf = tmp_path / "hf"
    convert_checkpoint(
        make_checkpoint(BF16_MINISTRAL_3, weights_format="safetensors"), hf, layout="hf"
    )
    (hf / "manifest.json").unlink()  # an HF folder as users have them
    config = json.loads((hf / "config.json").read_text())
    config["rope_parameters"] = edit(config["rope_parameters"])
    (hf / "config.json").write_text(json.dumps(config))
    message = convert_fails(hf, tmp_path / "out", expect=expect)
    assert "config.json" in message
