"""Loading is strict: a bad folder fails with one clear error naming the file/key and shapes,
and a pickle never gets to run code."""

import dataclasses
import json
import pickle
import zipfile

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest
import torch
from support import BASE, random_tokens, tiny_args

import reference_torch
from checkpoint.errors import CheckpointError
from checkpoint.folder import open_folder
from checkpoint.pth import read_pth_table
from checkpoint.tiny import random_state_dict, write_tiny_checkpoint
from model_jax import load_model
from model_jax.loading import PortLoader
from reference_torch.loading import ReferenceLoader, all_finite

LOADERS = {
    "torch": lambda folder: reference_torch.Transformer.from_folder(folder, dtype=torch.float32),
    "jax": lambda folder: load_model(folder, dtype=jnp.float32),
}


def folder_with_state(tmp_path, state, args=BASE):
    args.to_json(tmp_path / "params.json")
    torch.save(state, tmp_path / "consolidated.00.pth")
    return tmp_path


@pytest.fixture
def state():
    return {k: v.to(torch.bfloat16) for k, v in random_state_dict(BASE).items()}


@pytest.mark.parametrize("loader", LOADERS)
def test_missing_params_json(tmp_path, loader, state):
    folder_with_state(tmp_path, state)
    (tmp_path / "params.json").unlink()
    with pytest.raises(CheckpointError, match=r"params.json: file not found"):
        LOADERS[loader](tmp_path)


@pytest.mark.parametrize("loader", LOADERS)
def test_unknown_params_key(tmp_path, loader, state):
    folder_with_state(tmp_path, state)
    params = json.loads((tmp_path / "params.json").read_text()) | {"bogus": 1}
    (tmp_path / "params.json").write_text(json.dumps(params))
    with pytest.raises(CheckpointError, match=r"params.json: unknown key\(s\) bogus"):
        LOADERS[loader](tmp_path)


@pytest.mark.parametrize("loader", LOADERS)
def test_missing_tensor_is_named(tmp_path, loader, state):
    del state["layers.1.attention.wk.weight"]
    folder_with_state(tmp_path, state)
    with pytest.raises(
        CheckpointError,
        match=r"consolidated.00.pth: missing tensor layers.1.attention.wk.weight "
        r"\(expected shape \[32, 64\]\)",
    ):
        LOADERS[loader](tmp_path)


@pytest.mark.parametrize("loader", LOADERS)
def test_extra_tensor_is_named(tmp_path, loader, state):
    state["layers.0.attention.bias"] = torch.zeros(3)
    folder_with_state(tmp_path, state)
    with pytest.raises(CheckpointError, match=r"unexpected tensor layers.0.attention.bias"):
        LOADERS[loader](tmp_path)


@pytest.mark.parametrize("loader", LOADERS)
def test_wrong_shape_names_key_and_both_shapes(tmp_path, loader, state):
    state["layers.0.feed_forward.w2.weight"] = torch.zeros(64, 100, dtype=torch.bfloat16)
    folder_with_state(tmp_path, state)
    with pytest.raises(
        CheckpointError,
        match=r"tensor layers.0.feed_forward.w2.weight has shape \[64, 100\], "
        r"expected \[64, 128\]",
    ):
        LOADERS[loader](tmp_path)


@pytest.mark.parametrize("loader", LOADERS)
def test_neither_weights_file(tmp_path, loader):
    BASE.to_json(tmp_path / "params.json")
    with pytest.raises(CheckpointError, match=r"expected exactly one of .* found none"):
        LOADERS[loader](tmp_path)


class _RunsCode:
    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return (open, (self.sentinel, "w"))


@pytest.mark.parametrize("loader", LOADERS)
def test_pickle_that_would_run_code_is_refused_without_running(tmp_path, loader, state):
    sentinel = tmp_path / "pwned"
    state["payload"] = _RunsCode(str(sentinel))
    folder_with_state(tmp_path, state)
    with pytest.raises(CheckpointError, match=r"consolidated\.00\.pth"):
        LOADERS[loader](tmp_path)
    assert not sentinel.exists()


def test_restricted_reader_names_the_refused_global(tmp_path, state):
    sentinel = tmp_path / "pwned"
    state["payload"] = _RunsCode(str(sentinel))
    folder_with_state(tmp_path, state)
    with pytest.raises(CheckpointError, match=r"refusing to load global (builtins|io)\.open"):
        read_pth_table(tmp_path / "consolidated.00.pth")
    assert not sentinel.exists()


def test_restricted_reader_gives_the_bytes_torch_gives(tmp_path, state):
    folder_with_state(tmp_path, state)
    table = read_pth_table(tmp_path / "consolidated.00.pth")
    assert list(table) == list(state)
    for name, tensor in state.items():
        ours = table[name].array()
        assert ours.shape == tuple(tensor.shape)
        assert ours.tobytes() == tensor.view(torch.int16).numpy().tobytes()


def test_reader_refuses_non_contiguous_tensor(tmp_path):
    folder_with_state(tmp_path, {"w": torch.arange(12.0).reshape(3, 4).t()})
    with pytest.raises(CheckpointError, match="tensor w is not contiguous"):
        read_pth_table(tmp_path / "consolidated.00.pth")


def test_reader_handles_tensors_sharing_a_storage(tmp_path):
    base = torch.arange(12.0)
    folder_with_state(tmp_path, {"a": base[:4], "b": base[4:].view(2, 4)})
    table = read_pth_table(tmp_path / "consolidated.00.pth")
    assert table["b"].array().tolist() == base[4:].view(2, 4).tolist()


def test_reader_refuses_a_plain_pickle(tmp_path):
    path = tmp_path / "consolidated.00.pth"
    path.write_bytes(pickle.dumps({"w": [1.0]}))
    with pytest.raises(CheckpointError, match="not a readable torch zip checkpoint"):
        read_pth_table(path)


def test_reader_refuses_compressed_entries(tmp_path, state):
    src = folder_with_state(tmp_path, state) / "consolidated.00.pth"
    packed = tmp_path / "packed.pth"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as zout:
        for item in zin.infolist():
            zout.writestr(item.filename, zin.read(item.filename))
    with pytest.raises(CheckpointError, match="is compressed"):
        read_pth_table(packed)


@pytest.mark.parametrize("loader", LOADERS)
def test_safetensors_source_loads_like_pth(make_checkpoint, loader):
    args = tiny_args(sliding_window=8)
    pth = LOADERS[loader](make_checkpoint(args, seed=4))
    st = LOADERS[loader](make_checkpoint(args, seed=4, weights_format="safetensors"))
    tokens = random_tokens(12, args.vocab_size)
    if loader == "torch":
        tokens = torch.from_numpy(tokens).long()[None]
        assert torch.equal(pth(tokens), st(tokens))
    else:
        assert jnp.array_equal(pth(jnp.asarray(tokens)), st(jnp.asarray(tokens)))


def test_open_folder_refuses_both_weight_files(tmp_path):
    write_tiny_checkpoint(tmp_path, BASE, tokenizer=False)
    write_tiny_checkpoint(tmp_path, BASE, tokenizer=False, weights_format="safetensors")
    with pytest.raises(
        CheckpointError, match=r"found consolidated\.00\.pth, consolidated\.safetensors"
    ):
        open_folder(tmp_path)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_the_bit_level_finiteness_check_finds_every_nan_and_inf(dtype):
    info = torch.finfo(dtype)
    finite = torch.tensor([0.0, -0.0, info.max, -info.max, info.tiny, -info.eps], dtype=dtype)
    assert all_finite(finite)
    for bad in (float("nan"), -float("nan"), float("inf"), -float("inf")):
        tensor = finite.repeat(1000)
        tensor[1234] = bad
        assert not all_finite(tensor), bad
    assert all_finite(torch.empty(0, dtype=dtype))


def test_a_reference_block_asked_for_in_three_dtypes_is_read_once(tmp_path, state, monkeypatch):
    loader = ReferenceLoader(folder_with_state(tmp_path, state))
    reads = []
    original = loader._tensors.read
    monkeypatch.setattr(
        loader._tensors, "read", lambda names: reads.append(names) or original(names)
    )
    blocks = [loader.block(1, dtype=d) for d in ("bfloat16", "float32", "float64")]
    assert len(reads) == 1
    for block in blocks:  # each in its dtype, with the stored values
        weight = block.attention.wq.weight
        assert torch.equal(weight, state["layers.1.attention.wq.weight"].to(weight.dtype))
    loader.block(0, dtype="float32")
    assert len(reads) == 2


@pytest.mark.parametrize("tied", [False, True])
def test_a_shell_holds_only_what_its_part_needs(tmp_path, tied):
    args = dataclasses.replace(BASE, tied_embeddings=tied)
    folder = folder_with_state(tmp_path, random_state_dict(args), args)
    head = {"norm", "tok_embeddings" if tied else "output"}
    for part, loaded in (("embed", {"tok_embeddings"}), ("head", head)):
        torch_shell = ReferenceLoader(folder).shell(part, dtype="float32")
        on_meta = {n.split(".")[0] for n, p in torch_shell.named_parameters() if p.is_meta}
        in_memory = {n.split(".")[0] for n, p in torch_shell.named_parameters() if not p.is_meta}
        assert in_memory == loaded and "layers" in on_meta
        jax_shell = PortLoader(folder).shell(part, dtype="float32")
        arrays = {
            name
            for name in ("tok_embeddings", "norm", "output")
            if isinstance(getattr(jax_shell, name), eqx.Module)
            and isinstance(jax.tree.leaves(getattr(jax_shell, name))[0], jax.Array)
        }
        assert arrays == loaded
