"""A hub repo id as SRC: only the needed files are taken (official layout first, one tokenizer),
against a cache the test builds, with HF_HUB_OFFLINE=1 (nothing is downloaded)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support import tiny_args

from checkpoint.folder import open_folder
from convert.hub import needed_files, tokenizer_file

COMMIT = "0123456789abcdef0123456789abcdef01234567"
ARGS = tiny_args(vocab_size=32768, rope_theta=1e6)


def cache_repo(cache: Path, repo_id: str, files: dict[str, Path | bytes]) -> Path:
    """huggingface_hub's cache layout: refs/main → snapshots/<commit>/<file>."""
    root = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = root / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(COMMIT)
    for name, content in files.items():
        if isinstance(content, bytes):
            (snapshot / name).write_bytes(content)
        else:
            shutil.copyfile(content, snapshot / name)
    return snapshot


def convert_offline(cache: Path, src: str, out: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    command = [str(Path(sys.executable).with_name("mistral-convert")), src, str(out)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def release(make_checkpoint, tmp_path_factory):
    """A v0.3-style release: official files, plus the HF files and second tokenizer its hub
    repo also carries."""
    source = make_checkpoint(ARGS, weights_format="safetensors")
    hf = tmp_path_factory.mktemp("hf") / "hf"
    from convert.convert import convert_checkpoint

    convert_checkpoint(source, hf, layout="hf")
    return source, hf


def test_an_official_repo_converts_from_its_official_files_only(release, tmp_path):
    source, hf = release
    cache_repo(
        tmp_path / "hub",
        "mistralai/Tiny-v0.3",
        {
            "params.json": source / "params.json",
            "consolidated.safetensors": source / "consolidated.safetensors",
            "tokenizer.model.v3": source / "tokenizer.model.v3",
            "tokenizer.model": source / "tokenizer.model.v3",  # as the real repo ships both
            "config.json": hf / "config.json",
            "model-00001-of-00001.safetensors": hf / "model-00001-of-00001.safetensors",
            "README.md": b"# a model card\n",
        },
    )
    done = convert_offline(tmp_path / "hub", "mistralai/Tiny-v0.3", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["source"]["hub_repo"] == "mistralai/Tiny-v0.3"
    assert manifest["source"]["revision"] == COMMIT
    assert manifest["source"]["layout"] == "official"
    assert "tokenizer.model.v3" in manifest["files"] and "tokenizer.model" not in manifest["files"]
    ours, theirs = open_folder(tmp_path / "out").tensors, open_folder(source).tensors
    assert all(ours[k].array().tobytes() == theirs[k].array().tobytes() for k in theirs)


def test_an_hf_only_repo_converts_through_its_config(release, tmp_path):
    _, hf = release
    files = {p.name: p for p in hf.iterdir() if p.name != "manifest.json"}
    cache_repo(tmp_path / "hub", "someone/Tiny-hf", files)
    done = convert_offline(tmp_path / "hub", "someone/Tiny-hf", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["source"]["layout"] == "hf"


def test_a_repo_neither_local_nor_cached_is_one_line_exit_2(tmp_path):
    done = convert_offline(tmp_path / "hub", "mistralai/Not-There", tmp_path / "out")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: mistralai/Not-There: not a local")
    assert not (tmp_path / "out").exists()


def test_the_newest_tokenizer_and_safest_weights_are_chosen():
    assert tokenizer_file(["tokenizer.model", "tokenizer.model.v3", "tokenizer.model.v7"]) == (
        "tokenizer.model.v7"
    )
    assert tokenizer_file(["tokenizer.model.v3", "tekken.json"]) == "tekken.json"
    both = ["params.json", "consolidated.00.pth", "consolidated.safetensors", "tekken.json"]
    assert needed_files(both) == ["params.json", "consolidated.safetensors", "tekken.json"]
    split = [
        "params.json",
        "consolidated.safetensors.index.json",
        "consolidated-00002-of-00002.safetensors",
        "consolidated-00001-of-00002.safetensors",
        "tokenizer.model.v3",
        "model-00001-of-00051.safetensors",
        "original/consolidated.00.pth",
    ]
    assert needed_files(split) == [
        "params.json",
        "consolidated.safetensors.index.json",
        "consolidated-00001-of-00002.safetensors",
        "consolidated-00002-of-00002.safetensors",
        "tokenizer.model.v3",
    ]
    with pytest.raises(ValueError, match="no tokenizer"):
        needed_files(["params.json", "consolidated.safetensors"])
