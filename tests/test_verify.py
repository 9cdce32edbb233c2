"""mistral-verify: passes a correct conversion, fails injected faults naming the faulty block,
reports checksum mismatches, writes the report files, and exits 2 on bad input."""

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from conftest import tiny_args
from faults import FAULTS

from checkpoint.tiny import random_state_dict
from convert.convert import convert_checkpoint
from verify import runners
from verify.cli import main as verify_cli
from verify.run import run_verification

ARGS = tiny_args(vocab_size=32000, sliding_window=8, n_layers=4)
PROMPTS = [
    "The capital of France is",
    "A sliding window of eight tokens is shorter than this "
    "prompt, which is long enough to wrap the rolling buffer more than twice over.",
]
FAULTY_BLOCK = 2


@pytest.fixture(scope="module")
def clean(make_checkpoint, tmp_path_factory):
    source = make_checkpoint(ARGS, seed=11)
    out = tmp_path_factory.mktemp("verify") / "converted"
    convert_checkpoint(source, out)
    return source, out


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def test_clean_conversion_passes_and_writes_the_report(clean, prompts_file, tmp_path):
    source, out = clean
    result = CliRunner().invoke(
        verify_cli,
        [
            "--reference",
            str(source),
            "--converted",
            str(out),
            "--prompts",
            str(prompts_file),
            "--max-new-tokens",
            "12",
            "--report-dir",
            str(tmp_path / "report"),
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["verdict"] == "pass" and report["first_failing_layer"] is None
    assert [e["index"] for e in report["layers"]] == list(range(ARGS.n_layers))
    for key in ("logits", "generation", "checksums", "environment", "model_args"):
        assert key in report
    assert report["environment"]["versions"]["jax"] and report["generation"]["prompts"]
    assert (tmp_path / "report" / "report.md").read_text().startswith("# Parity report: PASS")
    assert (tmp_path / "report" / "drift.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_injected_fault_fails_and_names_the_block(clean, tmp_path, fault, dtype):
    source, _ = clean
    faulty = tmp_path / "faulty"
    shutil.copytree(source, faulty)
    state = {k: v.to(torch.bfloat16) for k, v in random_state_dict(ARGS, seed=11).items()}
    FAULTS[fault](state, ARGS, FAULTY_BLOCK)
    torch.save(state, faulty / "consolidated.00.pth")
    convert_checkpoint(faulty, tmp_path / "converted")  # a consistent manifest: numbers only
    result = run_verification(
        source, tmp_path / "converted", dtype=dtype, prompts=PROMPTS, stream_layers=True
    )
    assert result["verdict"] == "fail" and result["checksums"]["ok"]
    assert result["first_failing_layer"] == FAULTY_BLOCK, result["reasons"]
    assert all(e["passed"] for e in result["layers"][:FAULTY_BLOCK])


def test_checksum_mismatch_fails_but_numbers_still_run(clean, tmp_path):
    source, out = clean
    tampered = tmp_path / "tampered"
    shutil.copytree(out, tampered)
    (tampered / "params.json").write_text((tampered / "params.json").read_text() + " ")
    result = run_verification(source, tampered, prompts=PROMPTS, stream_layers=True)
    assert result["verdict"] == "fail" and not result["checksums"]["ok"]
    assert any("params.json" in r for r in result["reasons"])
    assert result["first_failing_layer"] is None and len(result["layers"]) == ARGS.n_layers


@pytest.mark.parametrize("bad", ["missing-folder", "missing-prompts-file", "bad-threshold"])
def test_bad_input_exits_2(clean, tmp_path, bad):
    source, out = clean
    argv = {
        "missing-folder": ["--reference", str(tmp_path / "nope"), "--converted", str(out)],
        "missing-prompts-file": [
            "--reference",
            str(source),
            "--converted",
            str(out),
            "--prompts",
            str(tmp_path / "none.txt"),
        ],
        "bad-threshold": [
            "--reference",
            str(source),
            "--converted",
            str(out),
            "--thresholds",
            "bogus=1",
        ],
    }[bad]
    result = CliRunner().invoke(verify_cli, argv)
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1


def test_stream_layers_never_loads_a_whole_state_dict(clean, monkeypatch):
    source, out = clean

    def whole_file_loader(*args, **kwargs):
        raise AssertionError("--stream-layers must not map or load the whole checkpoint")

    monkeypatch.setattr(runners, "read_state_dict", whole_file_loader)
    result = run_verification(source, out, prompts=PROMPTS[:1], stream_layers=True)
    assert result["verdict"] == "pass" and result["generation"] is None


def test_hf_peer_adds_columns_that_agree_with_the_reference(clean):
    pytest.importorskip("transformers")
    source, out = clean
    result = run_verification(source, out, prompts=PROMPTS, stream_layers=True, peer="hf")
    assert result["verdict"] == "pass" and result["peer"] == "hf"
    peer_logits = result["logits"]["peer"]
    assert peer_logits["fp32_rel_l2"] <= 1e-5
    assert peer_logits["bf16_error_over_floor"] <= 1.25
    blocks = [e for e in result["layers"] if "peer_rel_l2" in e]
    assert len(blocks) == ARGS.n_layers - 1  # the peer's last block output comes normed
    assert all(e["peer_fp32_rel_l2"] <= 1e-5 for e in blocks)
    assert result["final_norm"]["peer_fp32_rel_l2"] <= 1e-5
