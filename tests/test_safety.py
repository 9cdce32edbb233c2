"""Nothing of the user's is ever lost (real file systems, real processes): OUT = SRC, OUT inside
SRC, SRC inside OUT and the working directory are refused; only folders this toolkit wrote are
replaced, and only when asked; a folder appearing at OUT mid-run survives; concurrent runs on
one OUT: one wins, the other exits 2; a SIGKILLed run's leftovers are removed by the next run;
mistral-tiny and verify's reports never replace what is not theirs."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from support import tiny_args

from checkpoint.cli import main as tiny_cli
from convert import convert as convert_module
from convert.cli import main as convert_cli
from convert.convert import convert_checkpoint
from verify.cli import main as verify_cli

ARGS = tiny_args(vocab_size=32000, n_layers=1)
SLOW_CONVERT = """
import sys, time
from convert import convert
real, seconds = convert._write_folder, float(sys.argv[3])
def slow(*args, **kwargs):
    print("writing", flush=True)
    time.sleep(seconds)
    return real(*args, **kwargs)
convert._write_folder = slow
from convert.cli import main
sys.argv = ["mistral-convert", sys.argv[1], sys.argv[2]]
main()
"""


@pytest.fixture
def src(make_checkpoint, tmp_path):
    folder = tmp_path / "models" / "m7b"
    folder.parent.mkdir()
    os.symlink(make_checkpoint(ARGS), folder)  # a read-only view: the test's own copy is safe
    return folder.resolve()


@pytest.fixture
def own_src(make_checkpoint, tmp_path):
    """A source folder this test owns, so it can watch nothing in it is deleted."""
    folder = tmp_path / "models" / "m7b"
    folder.parent.mkdir(exist_ok=True)
    import shutil

    shutil.copytree(make_checkpoint(ARGS), folder)
    (folder.parent / "notes.txt").write_text("the user's")
    return folder


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def run(*argv) -> tuple[int, list[str]]:
    result = CliRunner().invoke(convert_cli, [str(a) for a in argv])
    return result.exit_code, result.stderr.strip().splitlines()


@pytest.mark.parametrize(
    ("out", "message"),
    [
        (lambda s: s, "is the source folder itself"),
        (lambda s: s.parent, "contains the source folder"),
        (lambda s: s / "converted", "is inside the source folder"),
    ],
    ids=["out-is-src", "out-is-srcs-parent", "out-inside-src"],
)
def test_overlapping_source_and_output_are_refused(own_src, out, message):
    before = snapshot(own_src.parent)
    code, err = run(own_src, out(own_src), "--overwrite")
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert snapshot(own_src.parent) == before


def test_the_working_directory_is_never_replaced(own_src, tmp_path, monkeypatch):
    out = tmp_path / "converted"
    assert run(own_src, out)[0] == 0
    monkeypatch.chdir(out)
    code, err = run(own_src, ".", "--overwrite")
    assert code == 2 and "current directory" in err[0]
    assert (out / "manifest.json").exists()
    assert not [p for p in tmp_path.iterdir() if ".old-" in p.name or ".partial-" in p.name]


def test_a_folder_of_the_users_is_never_replaced_even_with_overwrite(src, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    code, err = run(src, out, "--overwrite")
    assert code == 2 and "not written by mistral-convert" in err[0]
    assert (out / "thesis.tex").read_text() == "years of work"


def test_a_conversion_of_ours_is_replaced_when_asked_and_nothing_is_left(src, tmp_path):
    out = tmp_path / "converted"
    assert run(src, out)[0] == 0
    assert run(src, out)[0] == 2  # not without --overwrite
    assert run(src, out, "--overwrite")[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted", "models"]


def test_a_folder_appearing_at_out_mid_run_survives(src, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real = convert_module.write_manifest

    def user_creates_out(*args, **kwargs):
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        return real(*args, **kwargs)

    monkeypatch.setattr(convert_module, "write_manifest", user_creates_out)
    code, err = run(src, out)
    assert code == 2 and "appeared" in err[0], err
    assert (out / "notes.txt").read_text() == "mine" and len(list(out.iterdir())) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models", "out"]


def slow_conversion(src: Path, out: Path, seconds: float) -> subprocess.Popen:
    child = subprocess.Popen(
        [sys.executable, "-c", SLOW_CONVERT, str(src), str(out), str(seconds)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdout.readline().strip() == "writing"  # it holds the lock now
    return child


@pytest.mark.slow
def test_two_conversions_to_one_out_one_wins_the_other_exits_2(src, tmp_path):
    out = tmp_path / "out"
    first = slow_conversion(src, out, seconds=3)
    code, err = run(src, out)
    assert code == 2 and "another mistral-convert is writing it" in err[0], err
    _, errors = first.communicate(timeout=120)
    assert first.returncode == 0, errors
    assert (out / "manifest.json").exists()


def test_a_killed_conversions_leftovers_are_removed_by_the_next_run(src, tmp_path):
    out = tmp_path / "out"
    child = slow_conversion(src, out, seconds=60)
    child.send_signal(signal.SIGKILL)
    child.communicate(timeout=30)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    assert any(".partial-" in n for n in leftovers) and ".out.lock" in leftovers
    assert run(src, out)[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models", "out"]


def test_leftovers_it_cannot_attribute_are_reported_not_removed(src, tmp_path):
    foreign = tmp_path / ".out.partial-abcd1234"  # no owner in the name: maybe not ours
    foreign.mkdir()
    summary = convert_checkpoint(src, tmp_path / "out")
    assert foreign.exists() and any(str(foreign) in note for note in summary.notes)


def test_mistral_tiny_never_writes_into_an_existing_checkpoint(tmp_path, monkeypatch):
    existing = tmp_path / "ckpt"
    assert CliRunner().invoke(tiny_cli, [str(existing)]).exit_code == 0
    before = snapshot(existing)
    result = CliRunner().invoke(tiny_cli, [str(existing), "--seed", "3"])
    assert result.exit_code == 2 and "already exists" in result.stderr
    assert snapshot(existing) == before


def test_mistral_tiny_leaves_nothing_when_it_fails_midway(tmp_path, monkeypatch):
    import checkpoint.tiny

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.tiny, "copy_tokenizer", disk_full)
    result = CliRunner().invoke(tiny_cli, [str(tmp_path / "ckpt")])
    assert result.exit_code != 0
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", ["foreign-report", "a-file"])
def test_verify_never_overwrites_a_report_it_did_not_write(src, tmp_path, kind):
    out = tmp_path / "converted"
    assert run(src, out)[0] == 0
    report_dir = tmp_path / "reports"
    if kind == "a-file":
        report_dir.write_text("not a folder")
    else:
        report_dir.mkdir()
        (report_dir / "report.md").write_text("my own notes")
    before = report_dir.read_bytes() if kind == "a-file" else snapshot(report_dir)
    started = time.perf_counter()
    argv = ["--reference", src, "--converted", out, "--report-dir", report_dir]
    result = CliRunner().invoke(verify_cli, [str(a) for a in argv])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert time.perf_counter() - started < 20  # refused before the run, not after it
    after = report_dir.read_bytes() if kind == "a-file" else snapshot(report_dir)
    assert after == before
