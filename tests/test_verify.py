"""mistral-verify: passes a correct conversion and writes the report; judges the code users run
(a defect in the JAX forward fails it); reads the reference independently of the port in every
mode (a port-reader bug fails it); non-finite values fail; prompts come as text, tokens or chat;
bad input exits 2 with one line. The clean/fault table is tests/test_gates.py."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from support import tiny_args

import model_jax.model
from checkpoint.tensors import TensorRecord
from checkpoint.tiny import random_state_dict, write_tiny_checkpoint
from convert.convert import convert_checkpoint
from reference_torch.loading import ReferenceLoader
from verify import vocab
from verify.cli import main as verify_cli
from verify.results import REPORT_FORMAT
from verify.run import run_verification

ARGS = tiny_args(vocab_size=32000, sliding_window=8, n_layers=4)
PROMPTS = [
    "The capital of France is",
    "A sliding window of eight tokens is shorter than this "
    "prompt, which is long enough to wrap the rolling buffer more than twice over.",
]


@pytest.fixture(scope="module")
def clean(make_checkpoint, tmp_path_factory):
    source = make_checkpoint(ARGS, seed=11)
    out = tmp_path_factory.mktemp("verify") / "converted"
    convert_checkpoint(source, out)
    return source, out


def checkpoint_with(folder, tensor: str, index: tuple[int, int], value: float):
    """The clean checkpoint's weights with one element of `tensor` set to `value`."""
    state = {k: v.to(torch.bfloat16) for k, v in random_state_dict(ARGS, seed=11).items()}
    state[tensor][index] = value
    return write_tiny_checkpoint(folder, ARGS, state=state)


def verify_args(source, out, *extra):
    return ["--reference", str(source), "--converted", str(out), *map(str, extra)]


@pytest.mark.slow
def test_clean_conversion_passes_and_writes_the_report(clean, tmp_path):
    source, out = clean
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "\n".join(
            [
                json.dumps({"text": PROMPTS[0]}),
                json.dumps({"text": PROMPTS[1], "bos": False}),
                json.dumps({"tokens": [1, 415, 5565, 302]}),
                json.dumps({"messages": [{"role": "user", "content": "Hi, who are you?"}]}),
            ]
        )
        + "\n"
    )
    report_dir = tmp_path / "report"
    argv = verify_args(source, out, "--prompts", prompts, "--max-new-tokens", 6)
    result = CliRunner().invoke(verify_cli, [*argv, "--report-dir", str(report_dir)])
    assert result.exit_code == 0, result.output
    report = json.loads((report_dir / "report.json").read_text())
    assert report["verdict"] == "pass" and report["first_failing_layer"] is None
    assert [e["index"] for e in report["layers"]] == list(range(ARGS.n_layers))
    assert [p["kind"] for p in report["prompts"]] == ["text", "text", "tokens", "chat"]
    assert [p["bos"] for p in report["prompts"]] == [True, False, True, True]
    assert all(p["verdict"] == "pass" for p in report["prompts"])
    pieces = [p["piece"] for p in report["layers"][0]["pieces"]]
    assert pieces == ["attention_norm", "qkv", "attention", "ffn_norm", "feed_forward", "block"]
    assert report["generation"]["prompts"] and report["environment"]["versions"]["jax"]
    markdown = (report_dir / "report.md").read_text()
    assert markdown.startswith("# Parity report: PASS") and "| chat " in markdown
    assert (report_dir / "drift.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_a_defect_in_the_jax_forward_fails_verify(clean, patched):
    """Not the weights: the model's own code, scaling its logits by 1.01."""
    source, out = clean
    head = model_jax.model.Transformer.head

    def scaled_head(self, h):
        normed, logits = head(self, h)
        return normed, logits * 1.01

    patched(model_jax.model.Transformer, "head", scaled_head)
    for dtype in ("bfloat16", "float32"):
        result = run_verification(source, out, prompts=PROMPTS, dtype=dtype, max_new_tokens=4)
        assert result.verdict == "fail"
        assert any(r.startswith("logits: output: fp32 error") for r in result.reasons)


@pytest.mark.slow
@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
def test_a_bug_in_the_ports_reader_does_not_cancel_out(clean, monkeypatch, stream):
    """The reference is read by torch's own readers, so a bug in the port's reader shows."""
    source, out = clean
    array = TensorRecord.array

    def buggy(self):
        data = array(self)
        return data * 1.02 if self.name == "layers.2.feed_forward.w2.weight" else data

    monkeypatch.setattr(TensorRecord, "array", buggy)
    result = run_verification(source, out, prompts=PROMPTS, stream_layers=stream, max_new_tokens=4)
    assert result.verdict == "fail" and result.first_failing_layer == 2, result.reasons


@pytest.mark.slow
def test_reading_the_vocabulary_in_parts_keeps_every_figure(clean, monkeypatch):
    """Streamed, the embeddings are read for the prompts' tokens only (in both runs here; the
    same numbers as the whole table: tests/test_vocab_rows.py); with the head read 4096 rows
    at a time (8 slices of the 32000), the same verdict and figures as with it whole; the
    logits' fp32 figures move only in the float64 truth's summation order."""
    source, out = clean
    read, shell = [], ReferenceLoader.shell

    def spied(self, part, **kwargs):
        read.append((part, None if kwargs.get("rows") is None else len(kwargs["rows"])))
        return shell(self, part, **kwargs)

    monkeypatch.setattr(ReferenceLoader, "shell", spied)
    reports = []
    for head_bytes in (vocab.HEAD_BYTES, 8 * ARGS.dim * 4096):
        monkeypatch.setattr(vocab, "HEAD_BYTES", head_bytes)
        reports.append(
            run_verification(source, out, prompts=PROMPTS, stream_layers=True, max_new_tokens=4)
        )
    whole, parts = reports
    assert ("head", 4096) in read and ("head", 32000 - 7 * 4096) in read
    assert ("head", None) in read  # the first run: the head whole (≤ 1 GiB in float64)
    embeds = {n for part, n in read if part == "embed"}
    assert embeds and all(n is not None and n < 100 for n in embeds)  # the prompts' rows only
    assert whole.verdict == parts.verdict == "pass"
    assert whole.layers == parts.layers and whole.final_norm == parts.final_norm
    assert whole.logits.metrics == parts.logits.metrics and whole.generation == parts.generation
    assert parts.logits.fp32_error == pytest.approx(whole.logits.fp32_error, rel=1e-6)


@pytest.mark.slow
def test_nan_in_the_ports_output_head_fails_in_fp32(clean, tmp_path):
    source, _ = clean
    faulty = checkpoint_with(tmp_path / "faulty", "output.weight", (7, 3), float("nan"))
    convert_checkpoint(faulty, tmp_path / "converted")
    for stream in (True, False):
        result = run_verification(
            source,
            tmp_path / "converted",
            prompts=PROMPTS,
            dtype="float32",
            stream_layers=stream,
            max_new_tokens=4,
        )
        assert result.verdict == "fail" and result.logits.nonfinite > 0
        assert any("NaN/Inf" in r for r in result.reasons), result.reasons


@pytest.mark.slow
def test_a_non_finite_reference_is_bad_input(clean, tmp_path):
    _, out = clean
    broken = checkpoint_with(
        tmp_path / "reference", "layers.1.attention.wq.weight", (0, 0), float("inf")
    )
    result = CliRunner().invoke(verify_cli, verify_args(broken, out, "--stream-layers"))
    assert result.exit_code == 2, result.output
    assert "layers.1.attention.wq.weight is not finite" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_checksum_mismatch_fails_but_numbers_still_run(clean, tmp_path):
    source, out = clean
    tampered = tmp_path / "tampered"
    shutil.copytree(out, tampered)
    (tampered / "params.json").write_text((tampered / "params.json").read_text() + " ")
    result = run_verification(source, tampered, prompts=PROMPTS, stream_layers=True)
    assert result.verdict == "fail" and not result.checksums.ok
    assert any("params.json" in r for r in result.reasons)
    assert result.first_failing_layer is None and len(result.layers) == ARGS.n_layers


@pytest.mark.slow
def test_hf_peer_adds_columns_that_agree_with_the_reference(clean):
    pytest.importorskip("transformers")
    source, out = clean
    result = run_verification(source, out, prompts=PROMPTS, stream_layers=True, peer="hf")
    assert result.verdict == "pass" and result.peer == "hf"
    assert result.logits.peer.fp32_error <= 1e-5
    assert result.logits.peer.bf16_ratio <= 1.25
    blocks = [e for e in result.layers if e.peer_fp32_error is not None]
    assert len(blocks) == ARGS.n_layers - 1  # the peer's last block output comes normed
    assert all(e.peer_fp32_error <= 1e-5 for e in blocks)
    assert result.final_norm.peer_fp32_error <= 1e-5


def _other_model(tmp_path):
    folder = tmp_path / "other"
    write_tiny_checkpoint(folder, tiny_args(vocab_size=32000, sliding_window=16, n_layers=4))
    return folder


def _wrong_tokenizer(tmp_path, source):
    folder = tmp_path / "wrong-tokenizer"
    shutil.copytree(source, folder)
    (folder / "tokenizer.model").unlink()
    write_tiny_checkpoint(tmp_path / "v3", tiny_args(vocab_size=32768, n_layers=1))
    shutil.copy(tmp_path / "v3" / "tokenizer.model.v3", folder)
    return folder


BAD_INPUTS = {
    "missing-folder": (lambda s, o, t: verify_args(t / "nope", o), "not a directory"),
    "missing-prompts-file": (
        lambda s, o, t: verify_args(s, o, "--prompts", t / "none.txt"),
        "none.txt: file not found",
    ),
    "binary-prompts-file": (
        lambda s, o, t: verify_args(s, o, "--prompts", _write(t / "p.bin", b"\xff\xfe\x00\x81")),
        "p.bin: not a UTF-8 text file",
    ),
    "bad-jsonl-line": (
        lambda s, o, t: verify_args(
            s, o, "--prompts", _write(t / "p.jsonl", b'{"text": "ok"}\n{"tokens": [1, -4]}\n')
        ),
        'p.jsonl:2: "tokens" must be a list of ids',
    ),
    "bad-chat": (
        lambda s, o, t: verify_args(
            s, o, "--prompts", _write(t / "c.jsonl", b'{"messages": [{"role": "bot"}]}\n')
        ),
        "c.jsonl:1: each message needs a role",
    ),
    "unknown-threshold": (
        lambda s, o, t: verify_args(s, o, "--thresholds", "bogus=1"),
        "--thresholds: unknown threshold 'bogus'",
    ),
    "nan-threshold": (
        lambda s, o, t: verify_args(s, o, "--thresholds", "teacher_forced_bf16_ratio=nan"),
        "must be finite",
    ),
    "non-numeric-threshold": (
        lambda s, o, t: verify_args(s, o, "--thresholds", "free_bf16_ratio=high"),
        "'high' is not a number",
    ),
    "negative-max-new-tokens": (
        lambda s, o, t: verify_args(s, o, "--max-new-tokens", -1),
        "--max-new-tokens",
    ),
    "different-params": (
        lambda s, o, t: verify_args(_other_model(t), o),
        "describes a different model than",
    ),
    "tokenizer-vocab-differs": (
        lambda s, o, t: verify_args(_wrong_tokenizer(t, s), o),
        "vocabulary has 32768 tokens but",
    ),
}


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("bad", BAD_INPUTS)
def test_bad_input_exits_2_with_one_line(clean, tmp_path, bad):
    source, out = clean
    build, expected = BAD_INPUTS[bad]
    result = CliRunner().invoke(verify_cli, build(source, out, tmp_path))
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], lines


@pytest.mark.slow
def test_report_is_valid_json_even_with_non_finite_numbers(clean, tmp_path):
    source, _ = clean
    faulty = checkpoint_with(
        tmp_path / "faulty", "layers.3.feed_forward.w2.weight", (1, 1), float("nan")
    )
    convert_checkpoint(faulty, tmp_path / "converted")
    report_dir = tmp_path / "report"
    argv = verify_args(source, tmp_path / "converted", "--stream-layers", "--report-dir")
    result = CliRunner().invoke(verify_cli, [*argv, str(report_dir)])
    assert result.exit_code == 1, result.output
    report = json.loads((report_dir / "report.json").read_text())
    assert report["first_failing_layer"] == 3 and report["failing_blocks"] == [3]
    assert "block 3" in result.output
    assert np.isinf(float(report["layers"][3]["pieces"][-1]["bf16_ratio"]))


def test_a_corrupted_shard_header_is_a_checksum_failure_exit_1(clean, tmp_path):
    source, out = clean
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    shard = next(broken.glob("model-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[12:20] = b"\x00garbage"  # inside the JSON header
    shard.write_bytes(bytes(data))
    result = CliRunner().invoke(
        verify_cli, verify_args(source, broken, "--report-dir", tmp_path / "report")
    )
    assert result.exit_code == 1, result.output
    assert "does not match its manifest" in result.output and shard.name in result.output


@pytest.mark.slow
@pytest.mark.parametrize(
    "preset, expected",
    [({}, "false"), ({"XLA_PYTHON_CLIENT_PREALLOCATE": "true"}, "true")],
)
def test_importing_verify_stops_jax_preallocating_unless_the_user_chose(preset, expected):
    """torch shares the GPU: JAX must not grab 75 % of it at start-up."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("XLA_PYTHON_CLIENT")}
    code = "import os, verify; print(os.environ['XLA_PYTHON_CLIENT_PREALLOCATE'])"
    process = subprocess.run(
        [sys.executable, "-c", code], env=env | preset, capture_output=True, text=True
    )
    assert process.stdout.strip() == expected, process.stderr


def test_the_committed_demo_report_is_one_verify_may_replace():
    """`make demo` on a fresh clone rewrites reports/…: verify must recognise them as its own."""
    reports = sorted((Path(__file__).parents[1] / "reports").glob("*/report.json"))
    assert reports
    for path in reports:
        assert json.loads(path.read_text()).get("format") == REPORT_FORMAT, path
