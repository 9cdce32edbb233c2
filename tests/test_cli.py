"""mistral-tiny: writes a folder both models load; bad params exit 2."""

from click.testing import CliRunner

from checkpoint import cli as tiny_cli
from checkpoint.folder import open_folder
from checkpoint.tiny import TINY_ARGS


def test_tiny_writes_an_official_folder(tmp_path):
    result = CliRunner().invoke(tiny_cli.main, [str(tmp_path / "tiny")])
    assert result.exit_code == 0, result.output
    assert open_folder(tmp_path / "tiny").args == TINY_ARGS
    assert (tmp_path / "tiny" / "tokenizer.model").exists()


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
