"""mistral-convert: byte-identical sharded output, loadable by both models, verifiable."""

import hashlib
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from support import random_tokens, tiny_args

import reference_torch
from checkpoint.folder import INDEX_NAME, open_folder
from convert import stream
from convert.check import check_converted
from convert.cli import main as convert_cli
from convert.convert import convert_checkpoint
from convert.shard_files import parse_size, plan_shards, shard_name
from model_jax import load_model

ARGS = tiny_args(vocab_size=32000, sliding_window=8)  # the real v0.1 tokenizer fits


@pytest.fixture(params=["pth", "safetensors"])
def source(request, make_checkpoint):
    return make_checkpoint(ARGS, weights_format=request.param)


def test_every_tensor_is_byte_identical(source, tmp_path):
    summary = convert_checkpoint(source, tmp_path / "out", max_shard_size="3MB")
    ours, theirs = open_folder(tmp_path / "out").tensors, open_folder(source).tensors
    assert list(ours) == list(theirs)
    for name, record in theirs.items():
        assert ours[name].dtype == record.dtype and ours[name].shape == record.shape
        assert ours[name].array().tobytes() == record.array().tobytes(), name
    assert summary.shards > 1 and summary.tensors == len(theirs)


def test_converted_bytes_match_torch_load(make_checkpoint, tmp_path):
    source = make_checkpoint(ARGS)
    convert_checkpoint(source, tmp_path / "out")
    state = torch.load(source / "consolidated.00.pth", weights_only=True)
    for name, record in open_folder(tmp_path / "out").tensors.items():
        assert record.array().tobytes() == state[name].view(torch.int16).numpy().tobytes()


def test_output_folder_layout_and_index(source, tmp_path):
    out = tmp_path / "out"
    convert_checkpoint(source, out, max_shard_size="3MB")
    index = json.loads((out / INDEX_NAME).read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert shards == [shard_name(i, len(shards)) for i in range(len(shards))]
    assert sorted(set(index["weight_map"].values())) == shards
    records = open_folder(out).tensors
    assert index["metadata"]["total_size"] == sum(r.nbytes for r in records.values())
    assert list(index["weight_map"]) == list(records)  # key order
    for name in ("params.json", "tokenizer.model"):
        assert (out / name).read_bytes() == (source / name).read_bytes()
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["files"]) == {*shards, INDEX_NAME, "params.json", "tokenizer.model"}
    assert manifest["source"]["folder"] == str(source.resolve())


def test_shards_fill_in_key_order_and_big_tensors_stand_alone():
    sizes = {"a": 4, "b": 4, "c": 10, "d": 1, "e": 1}
    assert plan_shards(sizes, 8) == [["a", "b"], ["c"], ["d", "e"]]
    assert plan_shards(sizes, 100) == [list(sizes)]


@pytest.mark.parametrize(
    ("text", "size"), [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30), (7, 7)]
)
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.slow
def test_both_models_load_the_converted_folder_with_identical_logits(make_checkpoint, tmp_path):
    source = make_checkpoint(ARGS)
    convert_checkpoint(source, tmp_path / "out", max_shard_size="2MB")
    tokens = random_tokens(20, ARGS.vocab_size)
    jax_src = load_model(source, dtype=jnp.float32)(jnp.asarray(tokens))
    jax_out = load_model(tmp_path / "out", dtype=jnp.float32)(jnp.asarray(tokens))
    assert np.array_equal(np.asarray(jax_src), np.asarray(jax_out))
    batch = torch.from_numpy(tokens).long()[None]
    ref_src = reference_torch.Transformer.from_folder(source)(batch)
    ref_out = reference_torch.Transformer.from_folder(tmp_path / "out")(batch)
    assert torch.equal(ref_src, ref_out)


def test_dtype_float32_upcasts_exactly(make_checkpoint, tmp_path):
    source = make_checkpoint(ARGS)
    convert_checkpoint(source, tmp_path / "out", dtype="float32")
    ours, theirs = open_folder(tmp_path / "out").tensors, open_folder(source).tensors
    for name, record in theirs.items():
        assert ours[name].dtype == "F32"
        np.testing.assert_array_equal(ours[name].array(), record.array().astype(np.float32))


def test_check_passes_on_a_fresh_conversion(source, tmp_path):
    convert_checkpoint(source, tmp_path / "out", max_shard_size="3MB")
    assert check_converted(tmp_path / "out") == []
    result = CliRunner().invoke(convert_cli, ["--check", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output


def flip_bit(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("where", ["data", "header", "tokenizer"])
def test_check_catches_a_single_flipped_bit(make_checkpoint, tmp_path, where):
    out = tmp_path / "out"
    convert_checkpoint(make_checkpoint(ARGS), out, max_shard_size="3MB")
    target = {
        "data": out / shard_name(1, 3),
        "header": out / shard_name(0, 3),
        "tokenizer": out / "tokenizer.model",
    }[where]
    flip_bit(target, {"data": -12345, "header": 20, "tokenizer": 1000}[where])
    problems = check_converted(out)
    assert any(target.name in p for p in problems), problems
    result = CliRunner().invoke(convert_cli, ["--check", str(out)])
    assert result.exit_code == 1 and target.name in result.output


def test_check_catches_a_missing_shard_and_a_tampered_index(make_checkpoint, tmp_path):
    out = tmp_path / "out"
    convert_checkpoint(make_checkpoint(ARGS), out, max_shard_size="3MB")
    (out / shard_name(2, 3)).unlink()
    assert any(f"{shard_name(2, 3)}: missing" in p for p in check_converted(out))

    out2 = tmp_path / "out2"
    convert_checkpoint(make_checkpoint(ARGS), out2, max_shard_size="3MB")
    index = json.loads((out2 / INDEX_NAME).read_text())
    index["weight_map"]["norm.weight"] = shard_name(0, 3)  # claims the wrong shard
    (out2 / INDEX_NAME).write_text(json.dumps(index))
    problems = check_converted(out2)
    assert any(INDEX_NAME in p for p in problems) and any("norm.weight" in p for p in problems)


def test_cli_json_summary_and_quiet_when_not_a_terminal(make_checkpoint, tmp_path):
    result = CliRunner().invoke(
        convert_cli, [str(make_checkpoint(ARGS)), str(tmp_path / "out"), "--json"]
    )
    assert result.exit_code == 0, result.output
    assert "\r" not in result.output
    summary = json.loads(result.output)
    assert summary["tensors"] == 2 * 9 + 3 and summary["peak_rss_mb"] > 0


@pytest.mark.parametrize("kernel_copy", [True, False], ids=["copy_file_range", "buffered"])
def test_hashing_writer_copies_ranges_and_hashes_what_it_wrote(tmp_path, kernel_copy):
    source = tmp_path / "source.bin"
    source.write_bytes(np.random.default_rng(0).bytes(3 * stream.CHUNK_BYTES // 2 + 4099))
    writer = stream.HashingWriter(tmp_path / "out.bin")
    writer._kernel_copy = kernel_copy
    fd = os.open(source, os.O_RDONLY)
    try:
        writer.write(b"head")
        writer.copy_from(fd, 4099, stream.CHUNK_BYTES + 10)  # unaligned, more than one chunk
        writer.copy_from(fd, 7, 100)
        digest = writer.close()
    finally:
        os.close(fd)
    data = source.read_bytes()
    expected = b"head" + data[4099 : 4099 + stream.CHUNK_BYTES + 10] + data[7:107]
    assert (tmp_path / "out.bin").read_bytes() == expected
    assert digest == hashlib.sha256(expected).hexdigest() and writer.size == len(expected)


@pytest.mark.parametrize("gap", ["entry-outside-out", "unlisted-extra-file", "dropped-tokenizer"])
def test_check_closes_the_gaps_a_tampered_folder_could_use(make_checkpoint, tmp_path, gap):
    out = tmp_path / "out"
    convert_checkpoint(make_checkpoint(tiny_args(vocab_size=32000)), out)
    manifest = json.loads((out / "manifest.json").read_text())
    if gap == "entry-outside-out":
        manifest["files"]["../../../etc/passwd"] = {"sha256": "0" * 64, "bytes": 1}
    elif gap == "unlisted-extra-file":
        (out / "evil.py").write_text("import os\n")
    else:
        (out / "tokenizer.model").write_bytes(b"garbage")
        del manifest["files"]["tokenizer.model"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    problems = check_converted(out)
    expected = {
        "entry-outside-out": "is not a file name inside the folder",
        "unlisted-extra-file": "evil.py: not listed in the manifest",
        "dropped-tokenizer": "tokenizer.model: not listed in the manifest",
    }[gap]
    assert any(expected in p for p in problems), problems
