"""Every bad input to mistral-convert: one line on stderr naming the file and the problem,
exit code 2, no traceback, and nothing left at OUT (nor a partial folder beside it)."""

import errno
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner
from support import tiny_args

from checkpoint.tiny import random_state_dict
from convert import stream
from convert.cli import main as convert_cli

ARGS = tiny_args(vocab_size=32000, sliding_window=8)


@pytest.fixture
def src(make_checkpoint, tmp_path):
    """A private copy of a good checkpoint folder, to break."""
    folder = tmp_path / "src"
    shutil.copytree(make_checkpoint(ARGS), folder)
    return folder


def convert_fails(src, out, *extra, expect: str) -> str:
    result = CliRunner().invoke(convert_cli, [str(src), str(out), *extra])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert expect in lines[0], lines[0]
    assert not out.exists() or out.name == "existing"
    assert not [p for p in out.parent.iterdir() if ".partial-" in p.name]
    return lines[0]


def bf16_state():
    return {k: v.to(torch.bfloat16) for k, v in random_state_dict(ARGS).items()}


def write_safetensors(folder, header: dict, data: bytes, header_len: int | None = None):
    (folder / "consolidated.00.pth").unlink(missing_ok=True)
    raw = json.dumps(header).encode()
    length = len(raw) if header_len is None else header_len
    (folder / "consolidated.safetensors").write_bytes(struct.pack("<Q", length) + raw + data)


class _RunsCode:
    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def test_pickle_that_would_run_code(src, tmp_path):
    state = bf16_state() | {"evil": _RunsCode(tmp_path / "pwned")}
    torch.save(state, src / "consolidated.00.pth")
    convert_fails(src, tmp_path / "out", expect="refusing to load global")
    assert not (tmp_path / "pwned").exists()


def test_truncated_pth(src, tmp_path):
    path = src / "consolidated.00.pth"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    convert_fails(src, tmp_path / "out", expect="consolidated.00.pth: not a readable torch zip")


def test_not_a_zip(src, tmp_path):
    (src / "consolidated.00.pth").write_bytes(b"definitely not a zip file" * 100)
    convert_fails(src, tmp_path / "out", expect="consolidated.00.pth: not a readable torch zip")


def test_safetensors_bad_header_json(src, tmp_path):
    (src / "consolidated.00.pth").unlink()
    raw = b"{not json!"
    (src / "consolidated.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
    convert_fails(src, tmp_path / "out", expect="consolidated.safetensors: header is not valid")


def test_safetensors_header_length_past_end(src, tmp_path):
    write_safetensors(src, {}, b"", header_len=10**6)
    convert_fails(src, tmp_path / "out", expect="header length 1000000 runs past the end")


def test_safetensors_overlapping_offsets(src, tmp_path):
    header = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
    }
    write_safetensors(src, header, bytes(12))
    convert_fails(src, tmp_path / "out", expect="tensors a and b overlap")


def test_safetensors_offsets_out_of_range(src, tmp_path):
    header = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}
    write_safetensors(src, header, bytes(8))
    convert_fails(src, tmp_path / "out", expect="tensor a offsets [0, 16] are outside the data")


def test_missing_params_json(src, tmp_path):
    (src / "params.json").unlink()
    convert_fails(src, tmp_path / "out", expect="params.json: file not found")


def test_missing_tokenizer(src, tmp_path):
    (src / "tokenizer.model").unlink()
    convert_fails(src, tmp_path / "out", expect="expected exactly one tokenizer file")


def test_tokenizer_vocab_differs_from_params(src, tmp_path):
    params = json.loads((src / "params.json").read_text()) | {"vocab_size": 32768}
    (src / "params.json").write_text(json.dumps(params))
    state = {
        k: v.to(torch.bfloat16)
        for k, v in random_state_dict(tiny_args(vocab_size=32768, sliding_window=8)).items()
    }
    torch.save(state, src / "consolidated.00.pth")
    convert_fails(
        src,
        tmp_path / "out",
        expect="tokenizer.model: vocabulary has 32000 tokens but",
    )


@pytest.mark.parametrize(
    ("edit", "expect"),
    [
        (lambda s: s.pop("layers.1.ffn_norm.weight"), "missing tensor layers.1.ffn_norm.weight"),
        (lambda s: s.update(extra=torch.zeros(2)), "unexpected tensor extra"),
        (
            lambda s: s.update({"norm.weight": torch.zeros(65)}),
            "tensor norm.weight has shape [65], expected [64]",
        ),
    ],
    ids=["missing-tensor", "extra-tensor", "wrong-shape"],
)
def test_tensor_table_mismatch(src, tmp_path, edit, expect):
    state = bf16_state()
    edit(state)
    torch.save(state, src / "consolidated.00.pth")
    convert_fails(src, tmp_path / "out", expect=f"consolidated.00.pth: {expect}")


def test_unsupported_dtype_pth(src, tmp_path):
    state = bf16_state() | {"norm.weight": torch.ones(64, dtype=torch.int64)}
    torch.save(state, src / "consolidated.00.pth")
    convert_fails(src, tmp_path / "out", expect="unsupported tensor dtype torch.LongStorage")


def test_unsupported_dtype_safetensors(src, tmp_path):
    write_safetensors(src, {"a": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}}, bytes(8))
    convert_fails(src, tmp_path / "out", expect="tensor a has unsupported dtype I64")


def test_both_weight_files(src, tmp_path):
    (src / "consolidated.safetensors").write_bytes(b"")
    convert_fails(
        src, tmp_path / "out", expect="found consolidated.00.pth, consolidated.safetensors"
    )


def test_neither_weight_file(src, tmp_path):
    (src / "consolidated.00.pth").unlink()
    convert_fails(src, tmp_path / "out", expect="found none")


def test_existing_out_is_refused_unless_overwrite(src, tmp_path):
    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    convert_fails(src, out, expect="already exists (pass --overwrite")
    convert_fails(src, out, "--overwrite", expect="not written by mistral-convert")
    assert (out / "keep.txt").read_text() == "mine"  # a folder of the user's is never replaced
    converted = tmp_path / "converted"
    assert CliRunner().invoke(convert_cli, [str(src), str(converted)]).exit_code == 0
    result = CliRunner().invoke(convert_cli, [str(src), str(converted), "--overwrite"])
    assert result.exit_code == 0 and (converted / "manifest.json").exists()  # ours: replaced


def test_disk_full_during_write(src, tmp_path, monkeypatch):
    calls = []
    real_copy = stream.HashingWriter.copy_from

    def copy_until_full(self, fd, offset, nbytes, *rest):
        calls.append(nbytes)
        if len(calls) == 5:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_copy(self, fd, offset, nbytes, *rest)

    monkeypatch.setattr(stream.HashingWriter, "copy_from", copy_until_full)
    convert_fails(src, tmp_path / "out", expect="cannot write (No space left on device)")


# Run the real command in a child whose copies are slowed down, so it can be killed mid-way.
SLOW_CONVERT = """
import sys, time
from convert import stream
real = stream.HashingWriter.copy_from
def slow(self, *args):
    time.sleep(0.2)
    real(self, *args)
stream.HashingWriter.copy_from = slow
from convert.cli import main
main(sys.argv[1:])
"""


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_run_killed_mid_way_leaves_no_out(src, tmp_path, sig):
    out = tmp_path / "out"
    child = subprocess.Popen(
        [sys.executable, "-c", SLOW_CONVERT, str(src), str(out)], stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".out.partial-*/model-*")):
        assert time.monotonic() < deadline and child.poll() is None, "conversion never started"
        time.sleep(0.05)
    child.send_signal(sig)
    child.wait(timeout=30)
    assert not out.exists()
    if sig == signal.SIGTERM:  # a catchable signal also removes the partial folder
        assert child.returncode != 0 and not list(tmp_path.glob(".out.partial-*"))


def test_a_directory_in_place_of_the_weights_names_the_source(src, tmp_path):
    (src / "consolidated.00.pth").unlink()
    (src / "consolidated.00.pth").mkdir()
    convert_fails(src, tmp_path / "out", expect="consolidated.00.pth: is a directory")


def test_a_source_truncated_during_the_run_names_the_source(src, tmp_path, monkeypatch):
    real = stream.HashingWriter.copy_from

    def truncate_then_copy(self, fd, offset, nbytes, *rest):
        os.truncate(src / "consolidated.00.pth", offset)  # someone cuts the file meanwhile
        return real(self, fd, offset, nbytes, *rest)

    monkeypatch.setattr(stream.HashingWriter, "copy_from", truncate_then_copy)
    message = convert_fails(src, tmp_path / "out", expect="consolidated.00.pth: changed while")
    assert "being read (expected " in message and "bytes at offset" in message


@pytest.mark.parametrize("kernel_copy", [True, False], ids=["copy_file_range", "buffered"])
def test_the_writer_reports_a_source_that_ends_early(tmp_path, kernel_copy):
    source = tmp_path / "source.bin"
    source.write_bytes(bytes(5000))
    writer = stream.HashingWriter(tmp_path / "out.bin")
    writer._kernel_copy = kernel_copy
    fd = os.open(source, os.O_RDONLY)
    try:
        with pytest.raises(stream.SourceEnded) as ended:
            writer.copy_from(fd, 1000, 6000)
    finally:
        writer.abort()
        os.close(fd)
    expected = "changed while being read (expected 6000 bytes at offset 1000, got 4000)"
    assert str(ended.value) == expected


# The real command in a child that stops when it starts hashing the first tensor — the moment a
# mapping of the source (as the copy path once used) would be live — until the test has changed
# the source; a page of a mapped file cut meanwhile killed the process with SIGBUS (exit -7),
# leaving its hidden partial folder and lock behind.
PAUSED_CONVERT = """
import hashlib, sys
from convert import stream

class PausingSha:
    paused = False

    def __init__(self):
        self._sha = hashlib.sha256()

    def update(self, data):
        if len(data) >= 2**20 and not PausingSha.paused:
            PausingSha.paused = True
            print("hashing", flush=True)
            sys.stdin.readline()
        self._sha.update(data)

    def hexdigest(self):
        return self._sha.hexdigest()

class Hashlib:
    sha256 = PausingSha

stream.hashlib = Hashlib
from convert.cli import main
main(sys.argv[1:])
"""


def _truncate(path):
    os.truncate(path, 2**20)  # inside the first tensor (the embedding table, 4 MB)


def _replace(path):
    shutil.copyfile(path, path.with_name("new"))
    os.replace(path.with_name("new"), path)  # same bytes, another file


def _rewrite(path):
    with open(path, "r+b") as f:  # same size, new bytes at the end
        f.seek(-16, os.SEEK_END)
        f.write(b"x" * 16)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("change", "expect"),
    [
        (_truncate, "changed while being read (expected "),
        (_replace, "replaced while being read"),
        (_rewrite, "changed while being read (modified since the start)"),
    ],
    ids=["truncated", "replaced", "rewritten"],
)
def test_a_source_changed_mid_run_is_one_line_and_leaves_nothing(src, tmp_path, change, expect):
    out = tmp_path / "out"
    child = subprocess.Popen(
        [sys.executable, "-c", PAUSED_CONVERT, str(src), str(out)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "hashing", child.stderr.read()
        change(src / "consolidated.00.pth")
        _, errors = child.communicate("go\n", timeout=60)
    finally:
        child.kill()
    assert child.returncode == 2, (child.returncode, errors)
    lines = errors.strip().splitlines()
    assert len(lines) == 1 and f"{src / 'consolidated.00.pth'}: {expect}" in lines[0], errors
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no partial, no lock
