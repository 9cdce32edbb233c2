"""The command-line tools: exit 0 on parity, 1 on a parity failure, 2 on bad input."""

import json

import torch
from click.testing import CliRunner
from conftest import BASE

from checkpoint import cli as tiny_cli
from checkpoint.tiny import TINY_ARGS, random_state_dict
from verify import cli as verify_cli


def test_tiny_then_verify_passes(tmp_path):
    runner = CliRunner()
    assert runner.invoke(tiny_cli.main, [str(tmp_path / "tiny")]).exit_code == 0
    result = runner.invoke(verify_cli.main, ["--reference", str(tmp_path / "tiny"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["verdict"] == "pass"
    assert [row["dtype"] for row in report["logits"]] == ["float32", "bfloat16"]


def test_verify_fails_on_a_slightly_scaled_weight(tmp_path):
    runner = CliRunner()
    runner.invoke(tiny_cli.main, [str(tmp_path / "ref")])
    runner.invoke(tiny_cli.main, [str(tmp_path / "bad")])
    state = {k: v.to(torch.bfloat16) for k, v in random_state_dict(TINY_ARGS).items()}
    state["layers.2.feed_forward.w2.weight"] *= 1.02
    torch.save(state, tmp_path / "bad" / "consolidated.00.pth")
    result = runner.invoke(
        verify_cli.main,
        ["--reference", str(tmp_path / "ref"), "--converted", str(tmp_path / "bad")],
    )
    assert result.exit_code == 1, result.output
    assert "FAIL" in result.output


def test_verify_bad_input_exits_2_with_one_line(tmp_path):
    BASE.to_json(tmp_path / "params.json")
    result = CliRunner().invoke(verify_cli.main, ["--reference", str(tmp_path)])
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0 and "tokenizer.model" in result.output


def test_tiny_refuses_bad_params_with_exit_2(tmp_path):
    (tmp_path / "params.json").write_text('{"dim": 1}')
    result = CliRunner().invoke(
        tiny_cli.main, [str(tmp_path / "out"), "--params", str(tmp_path / "params.json")]
    )
    assert result.exit_code == 2 and "missing key(s)" in result.output
