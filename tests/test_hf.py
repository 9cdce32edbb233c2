"""HF interop: the rotary permutation and its inverse, official → HF → official round trip,
and the HF export loading in transformers with the same fp32 logits as our models."""

import json

import numpy as np
import pytest
import torch
from conftest import random_tokens, relative_error, tiny_args

import reference_torch
from checkpoint.args import MoeArgs
from checkpoint.folder import open_folder
from checkpoint.hf import halves_to_interleaved, interleaved_to_halves
from convert.check import check_converted
from convert.convert import convert_checkpoint

MEMBERS = {
    "mistral": tiny_args(vocab_size=32000, sliding_window=8),
    "mistral-head-dim": tiny_args(vocab_size=32768, head_dim=24, rope_theta=1e6),
    "mixtral": tiny_args(
        vocab_size=32000, rope_theta=1e6, moe=MoeArgs(num_experts=4, num_experts_per_tok=2)
    ),
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
    hf = w.view(4, 6 // 2, 2, 5).transpose(1, 2).reshape(4 * 6, 5)  # DESIGN.md §2
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


def test_transformers_loads_the_export_with_our_logits(exported):
    transformers = pytest.importorskip("transformers")
    args, source, hf = exported
    model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    tokens = torch.from_numpy(random_tokens(20, args.vocab_size)).long()[None]
    with torch.no_grad():
        theirs = model(tokens).logits[0].numpy()
    ours = reference_torch.Transformer.from_folder(source, dtype=torch.float32)(tokens)[0]
    assert relative_error(theirs, ours.numpy()) <= 1e-5
