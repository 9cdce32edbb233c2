"""HF interop: the rotary permutation and its inverse, official → HF → official round trip,
and the HF export loading in transformers with the same fp32 logits as our models."""

import json
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from support import random_tokens, relative_error, tiny_args

import reference_torch
from checkpoint.args import MoeArgs
from checkpoint.folder import open_folder
from checkpoint.hf import hf_config
from checkpoint.hf_names import halves_to_interleaved, interleaved_to_halves
from checkpoint.presets import PRESETS
from checkpoint.tiny import copy_tokenizer
from convert.check import check_converted
from convert.cli import main as convert_cli
from convert.convert import convert_checkpoint

MEMBERS = {
    "mistral": tiny_args(vocab_size=32000, sliding_window=8),
    "mistral-head-dim": tiny_args(vocab_size=32768, head_dim=24, rope_theta=1e6),
    "mixtral": tiny_args(
        vocab_size=32000, rope_theta=1e6, moe=MoeArgs(num_experts=4, num_experts_per_tok=2)
    ),
    "ministral": tiny_args(vocab_size=32000, n_layers=4, sliding_window=[None, 8, 8, 8]),
}


def test_permutation_on_a_hand_written_head():
    # One head of head_dim 4, one input column: rows are (x0, x1, x2, x3) = pairs (x0,x1),(x2,x3).
    w = np.arange(8).reshape(8, 1)  # two heads
    halves = interleaved_to_halves(w, n_heads=2)
    # rotate_half wants each head as (first elements of pairs, second elements of pairs).
    assert halves[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    assert halves_to_interleaved(halves, n_heads=2).tolist() == w.tolist()


def test_permutation_matches_the_hf_formula():
    w = torch.randn(4 * 6, 5)
    hf = w.view(4, 6 // 2, 2, 5).transpose(1, 2).reshape(4 * 6, 5)  # docs/formats.md, "HF interop"
    assert np.array_equal(interleaved_to_halves(w.numpy(), 4), hf.numpy())


@pytest.fixture(params=MEMBERS, scope="module")
def exported(request, make_checkpoint, tmp_path_factory):
    args = MEMBERS[request.param]
    source = make_checkpoint(args, seed=3)
    hf = tmp_path_factory.mktemp(request.param) / "hf"
    convert_checkpoint(source, hf, layout="hf", max_shard_size="3MB")
    return args, source, hf


def test_hf_round_trip_is_byte_identical(exported, tmp_path):
    _, source, hf = exported
    convert_checkpoint(hf, tmp_path / "back")
    ours, theirs = open_folder(tmp_path / "back").tensors, open_folder(source).tensors
    assert list(ours) == list(theirs)
    for name, record in theirs.items():
        assert ours[name].array().tobytes() == record.array().tobytes(), name
    assert json.loads((tmp_path / "back" / "params.json").read_text()) == json.loads(
        (source / "params.json").read_text()
    )


def test_hf_export_passes_check(exported):
    _, _, hf = exported
    assert check_converted(hf) == []


@pytest.mark.slow
def test_transformers_loads_the_export_with_our_logits(exported):
    transformers = pytest.importorskip("transformers")
    args, source, hf = exported
    model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    tokens = torch.from_numpy(random_tokens(20, args.vocab_size)).long()[None]
    with torch.no_grad():
        theirs = model(tokens).logits[0].numpy()
    ours = reference_torch.Transformer.from_folder(source, dtype=torch.float32)(tokens)[0]
    assert relative_error(theirs, ours.numpy()) <= 1e-5


def saved_by_transformers(folder, config_class, **config):
    """A random model saved by the installed transformers (5.x writes `rope_parameters`,
    `dtype`; drops lm_head.weight when tied), with the real v1 tokenizer beside it."""
    transformers = pytest.importorskip("transformers")
    base = dict(
        vocab_size=32000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    )
    torch.manual_seed(0)
    model = getattr(transformers, config_class.replace("Config", "ForCausalLM"))(
        getattr(transformers, config_class)(**(base | config))
    )
    model.save_pretrained(folder)
    copy_tokenizer(folder, 32000)
    return model.eval()


@pytest.mark.parametrize(
    "config",
    [
        {"rope_theta": 1e6, "sliding_window": 8},
        {"rope_theta": 5e5, "tie_word_embeddings": True},
    ],
    ids=["rope-theta-1e6", "tied-embeddings"],
)
def test_a_folder_saved_by_transformers_converts_to_the_same_model(tmp_path, config):
    transformers = pytest.importorskip("transformers")
    model = saved_by_transformers(tmp_path / "hf", "MistralConfig", **config)
    saved = json.loads((tmp_path / "hf" / "config.json").read_text())
    convert_checkpoint(tmp_path / "hf", tmp_path / "out")
    params = json.loads((tmp_path / "out" / "params.json").read_text())
    assert params["rope_theta"] == config["rope_theta"]
    tokens = torch.from_numpy(random_tokens(20, 32000)).long()
    with torch.no_grad():
        theirs = model(tokens[None]).logits[0].numpy()
    if config.get("tie_word_embeddings"):
        # The head is the embedding table: params.json says so, and no output.weight is made
        # up (as the official tied releases ship). Back in transformers, the same model.
        assert params["tied_embeddings"] is True
        assert "output.weight" not in open_folder(tmp_path / "out").tensors
        convert_checkpoint(tmp_path / "out", tmp_path / "again", layout="hf")
        config_again = json.loads((tmp_path / "again" / "config.json").read_text())
        assert config_again["tie_word_embeddings"] is True
        again = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path / "again", dtype=torch.float32
        ).eval()
        with torch.no_grad():
            ours = again(tokens[None]).logits[0].numpy()
        assert relative_error(ours, theirs) <= 1e-6
    else:
        ours = reference_torch.Transformer.from_folder(tmp_path / "out", dtype=torch.float32)
        assert relative_error(ours(tokens[None])[0].numpy(), theirs) <= 1e-5
    assert "rope_theta" in saved or "rope_parameters" in saved  # whichever this version writes


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling .* not supported"),
        (
            {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}},
            "rope_parameters .* not supported",
        ),
        ({"attention_bias": True}, "attention_bias True is not supported"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
        ({"model_type": "llama"}, "model_type 'llama' is not supported"),
        ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
        ({"quantization_config": {"quant_method": "awq"}}, "unsupported key.*quantization_config"),
        ({"logit_softcapping": 30.0}, "unsupported key.*logit_softcapping"),
        ({"rope_theta": 1e4, "rope_parameters": {"rope_theta": 1e6}}, "rope_theta .* differ"),
    ],
    ids=[
        "rope-scaling",
        "yarn",
        "attention-bias",
        "gelu",
        "llama",
        "gpt2",
        "quantized",
        "unknown-key",
        "two-thetas",
    ],
)
def test_hf_configs_that_would_change_the_model_are_refused_by_name(tmp_path, edit, message):
    saved_by_transformers(tmp_path / "hf", "MistralConfig")
    path = tmp_path / "hf" / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | edit))
    result = CliRunner().invoke(convert_cli, [str(tmp_path / "hf"), str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "config.json" in lines[0] and re.search(message, lines[0])
    assert not (tmp_path / "out").exists()


def test_ministral_layer_types_map_to_per_layer_windows_and_back(tmp_path):
    model = saved_by_transformers(
        tmp_path / "hf",
        "MinistralConfig",
        num_hidden_layers=4,
        sliding_window=8,
        layer_types=["full_attention"] + ["sliding_attention"] * 3,
    )
    convert_checkpoint(tmp_path / "hf", tmp_path / "out")
    params = json.loads((tmp_path / "out" / "params.json").read_text())
    assert params["sliding_window"] == [None, 8, 8, 8]
    tokens = torch.from_numpy(random_tokens(30, 32000)).long()  # past the window
    with torch.no_grad():
        theirs = model(tokens[None]).logits[0].numpy()
    ours = reference_torch.Transformer.from_folder(tmp_path / "out", dtype=torch.float32)
    assert relative_error(ours(tokens[None])[0].numpy(), theirs) <= 1e-5


def test_the_published_ministral_pattern_exports_exactly_within_its_context():
    # [131072, 32768, 32768, 32768]: a window as long as the context is full attention there.
    config = hf_config(PRESETS["ministral-8b"], "bfloat16")
    assert config["model_type"] == "ministral" and config["max_position_embeddings"] == 131072
    assert config["sliding_window"] == 32768
    assert config["layer_types"][:4] == ["full_attention"] + ["sliding_attention"] * 3
    assert len(config["layer_types"]) == 36


def test_windows_transformers_cannot_express_are_refused_not_approximated():
    with pytest.raises(ValueError, match="cannot express these per-layer windows exactly"):
        hf_config(tiny_args(n_layers=4, sliding_window=[4, 12]), "bfloat16")
