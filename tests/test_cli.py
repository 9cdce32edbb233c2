"""The four commands agree: folders are arguments, options mean the same thing everywhere, an
option the chosen mode would ignore is refused (exit 2, one line naming both, nothing written),
and library warnings never add lines to a refusal. mistral-tiny: writes a folder both models
load; bad params exit 2."""

import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner

from checkpoint import cli as tiny_cli
from checkpoint.cli_errors import DEFAULT_NEW_TOKENS, MAX_NEW_TOKENS
from checkpoint.dtypes import DTYPE_NAMES
from checkpoint.folder import open_folder
from checkpoint.tiny import TINY_ARGS
from convert.cli import main as convert_cli
from convert.convert import convert_checkpoint
from model_jax.cli import main as generate_cli
from verify.cli import main as verify_cli


def test_tiny_writes_an_official_folder(tmp_path):
    result = CliRunner().invoke(tiny_cli.main, [str(tmp_path / "tiny")])
    assert result.exit_code == 0, result.output
    assert open_folder(tmp_path / "tiny").args == TINY_ARGS
    assert (tmp_path / "tiny" / "tokenizer.model").exists()


@pytest.mark.slow
def test_tiny_preset_writes_full_width_blocks(tmp_path):
    result = CliRunner().invoke(
        tiny_cli.main, [str(tmp_path / "p"), "--preset", "7b-v0.1", "--n-layers", "1"]
    )
    assert result.exit_code == 0, result.output
    folder = open_folder(tmp_path / "p")
    assert folder.tensors["layers.0.feed_forward.w1.weight"].shape == (14336, 4096)


def test_tiny_refuses_bad_params_with_exit_2(tmp_path):
    (tmp_path / "params.json").write_text('{"dim": 1}')
    result = CliRunner().invoke(
        tiny_cli.main, [str(tmp_path / "out"), "--params", str(tmp_path / "params.json")]
    )
    assert result.exit_code == 2 and "missing key(s)" in result.output


COMMANDS = {
    "mistral-convert": convert_cli,
    "mistral-verify": verify_cli,
    "mistral-generate": generate_cli,
    "mistral-tiny": tiny_cli.main,
}
BIN = Path(sys.executable).parent


def option(command: click.Command, flag: str) -> click.Option | None:
    return next((p for p in command.params if flag in p.opts), None)


def test_shared_options_are_spelled_typed_and_defaulted_alike():
    for name, command in COMMANDS.items():
        assert option(command, "--json") is not None, f"{name} has no --json"
    # one dtype vocabulary: all of it where every dtype makes sense (convert adds "keep": copy
    # as stored), spelled the same where a command supports fewer (verify: bf16 and its fp32 truth)
    assert list(option(convert_cli, "--dtype").type.choices) == ["keep", *DTYPE_NAMES]
    assert list(option(generate_cli, "--dtype").type.choices) == list(DTYPE_NAMES)
    assert list(option(verify_cli, "--dtype").type.choices) == ["bfloat16", "float32"]
    assert option(verify_cli, "--dtype").default == option(generate_cli, "--dtype").default
    for command in (verify_cli, generate_cli):
        new_tokens = option(command, "--max-new-tokens")
        assert new_tokens.default == DEFAULT_NEW_TOKENS == 32
        assert (new_tokens.type.min, new_tokens.type.max) == (1, MAX_NEW_TOKENS)
        mesh = option(command, "--mesh")
        assert mesh.name == "mesh" and mesh.metavar == "DATAxMODEL|DATAxEXPERTxMODEL"


def refused(command, argv, *, expect: tuple[str, ...], cwd: Path) -> None:
    """Exit 2, exactly one line on stderr naming every string of `expect`, nothing written."""
    before = sorted(p.relative_to(cwd) for p in cwd.rglob("*"))
    result = CliRunner().invoke(command, [str(a) for a in argv])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert all(word in lines[0] for word in expect), lines[0]
    assert result.stdout == ""
    assert sorted(p.relative_to(cwd) for p in cwd.rglob("*")) == before


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    CliRunner().invoke(tiny_cli.main, [str(folder / "tiny")])
    convert_checkpoint(folder / "tiny", folder / "tiny-jax")
    return folder / "tiny", folder / "tiny-jax"


@pytest.mark.parametrize(
    "extra",
    [
        ["--dtype", "bfloat16"],
        ["--dtype", "keep"],  # even its default value, given: the user expects an effect
        ["--format", "hf"],
        ["--overwrite"],
        ["--max-shard-size", "1GB"],
    ],
    ids=["dtype", "dtype-keep", "format", "overwrite", "max-shard-size"],
)
def test_convert_check_refuses_options_it_would_ignore(converted, extra):
    _, out = converted
    refused(convert_cli, ["--check", out, *extra], expect=(extra[0], "--check"), cwd=out.parent)


def test_convert_check_still_takes_json(converted):
    _, out = converted
    result = CliRunner().invoke(convert_cli, ["--check", str(out), "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["ok"] is True


@pytest.mark.parametrize(
    ("argv", "expect"),
    [
        (["--n-layers", "2"], ("--n-layers", "--preset")),
        (["--preset", "7b-v0.1", "--params", "params.json"], ("--params", "--preset")),
        (["--preset", "7b-v0.1", "--format", "safetensors"], ("--format", "--preset")),
        (["--preset", "7b-v0.1", "--format", "pth"], ("--format", "--preset")),
        (["--preset", "7b-v0.1", "--weights", "trained-like"], ("--weights", "--preset")),
    ],
    ids=["n-layers-without-preset", "params", "format", "format-pth", "weights"],
)
def test_tiny_refuses_options_its_mode_would_ignore(tmp_path, argv, expect):
    (tmp_path / "params.json").write_text(json.dumps(TINY_ARGS.to_dict()))
    argv = [a if a != "params.json" else tmp_path / a for a in argv]
    refused(tiny_cli.main, [tmp_path / "out", *argv], expect=expect, cwd=tmp_path)


@pytest.mark.parametrize("extra", [["--seed", "1"], ["--top-p", "0.9"], ["--top-k", "5"]])
def test_generate_refuses_sampling_options_when_greedy(converted, extra):
    _, out = converted
    argv = [out, "--prompt", "Hi", *extra]
    refused(generate_cli, argv, expect=(extra[0], "--temperature"), cwd=out.parent)


@pytest.mark.parametrize(
    ("form", "expect"),
    [
        (lambda ref, conv: [ref], ("REFERENCE and CONVERTED",)),
        (lambda ref, conv: [ref, conv, conv], ("REFERENCE and CONVERTED",)),
        (lambda ref, conv: ["--reference", ref, conv], ("--reference", "--converted")),
        (lambda ref, conv: [ref, "--converted", conv], ("--reference", "--converted")),
    ],
    ids=["one-folder", "three-folders", "mixed-reference", "mixed-converted"],
)
def test_verify_folders_are_arguments_or_both_options(converted, form, expect):
    refused(verify_cli, form(*converted), expect=expect, cwd=converted[0].parent)


@pytest.mark.parametrize("form", ["arguments", "options"])
def test_verify_reads_its_folders_from_either_form(converted, tmp_path, form):
    reference, out = converted
    folders = [reference, out] if form == "arguments" else ["--reference", reference]
    folders += [] if form == "arguments" else ["--converted", out]
    report_dir = tmp_path / "report"
    report_dir.write_text("a file of the user's")  # refused before anything runs
    refused(verify_cli, [*folders, "--report-dir", report_dir], expect=("report",), cwd=tmp_path)


# Warnings of libraries (torch's about a pickle protocol, …) stay off a refusal's one line, and
# still show after a command that runs to its verdict. Real processes: pytest records warnings
# itself, so only a child shows what a user's terminal would.

WARNS_THEN_EXITS = """
import sys, warnings
import click
from checkpoint.cli_errors import OneLineErrors

@click.command(cls=OneLineErrors)
@click.argument("code", type=int)
def main(code):
    warnings.warn("a library's advice", UserWarning)
    if code:
        click.echo(f"error: refused with {code}", err=True)
    sys.exit(code)

main()
"""


def child_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}


@pytest.mark.parametrize(("code", "shown"), [(2, False), (130, False), (1, True), (0, True)])
def test_library_warnings_are_held_back_on_a_refusal_only(code, shown):
    child = subprocess.run(
        [sys.executable, "-c", WARNS_THEN_EXITS, str(code)],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=60,
    )
    assert child.returncode == code
    assert ("a library's advice" in child.stderr) == shown, child.stderr
    if not shown:
        assert child.stderr == f"error: refused with {code}\n"


@pytest.mark.slow
def test_a_protocol_4_pickle_is_refused_in_exactly_one_line(converted, tmp_path):
    """torch.load warns about the protocol before refusing the file: only our line shows."""
    reference, out = converted
    odd = tmp_path / "protocol-4"
    odd.mkdir()
    for name in ("params.json", "tokenizer.model"):
        (odd / name).write_bytes((reference / name).read_bytes())
    state = torch.load(reference / "consolidated.00.pth", weights_only=True)
    torch.save(state, odd / "consolidated.00.pth", pickle_protocol=4)
    report_dir = tmp_path / "report"
    child = subprocess.run(
        [BIN / "mistral-verify", odd, out, "--report-dir", report_dir],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=120,
    )
    assert child.returncode == 2, child.stderr
    lines = child.stderr.strip().splitlines()
    assert len(lines) == 1 and "protocol-4/consolidated.00.pth" in lines[0], child.stderr
    assert not report_dir.exists()


@pytest.mark.slow
def test_tiny_and_generate_print_json_when_asked(converted, tmp_path):
    result = CliRunner().invoke(tiny_cli.main, [str(tmp_path / "t"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["folder"] == str(tmp_path / "t") and "consolidated.00.pth" in summary["files"]
    _, out = converted
    argv = [str(out), "--prompt", "Hi", "--prompt", "The capital of", "--max-new-tokens", "3"]
    result = CliRunner().invoke(generate_cli, [*argv, "--json"])
    assert result.exit_code == 0, result.output
    results = json.loads(result.stdout)["results"]
    assert [r["prompt"] for r in results] == ["Hi", "The capital of"]
    assert all(len(r["new_ids"]) <= 3 and r["prompt_ids"][0] == 1 for r in results)
