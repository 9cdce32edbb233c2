"""What streaming keeps between the dtypes and the blocks verify asks for, and that keeping it
changes no value: the port casts a group it read exactly as stored (bf16) to a wider dtype on
the device instead of reading it again; the reference casts each block into one host buffer,
reused from block to block but never while the block last built in it lives."""

import os

import jax
import numpy as np
import pytest
import torch
from support import tiny_args

from checkpoint.folder import open_folder
from model_jax.loading import PortLoader
from reference_torch.cast_buffer import CastBuffer
from reference_torch.loading import ReferenceLoader
from verify.implementation import judge_apart
from verify.runners import JaxRunner, TorchRunner

ARGS = tiny_args(n_layers=3)
DTYPES = ("bfloat16", "float32")  # the port's


@pytest.fixture(scope="module", params=[torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def stored(request):
    return request.param


@pytest.fixture
def folder(make_checkpoint, stored):
    return make_checkpoint(ARGS, seed=7, dtype=stored)


def _same_arrays(got, expected) -> bool:
    pairs = zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True)
    return all(a.dtype == b.dtype and np.array_equal(a, b) for a, b in pairs)


def test_port_group_asked_for_again_wider_is_cast_not_read(folder, stored, monkeypatch):
    read_alone = {dtype: PortLoader(folder).group(1, dtype=dtype) for dtype in DTYPES}
    reads = []
    fill = PortLoader._fill
    monkeypatch.setattr(
        PortLoader, "_fill", lambda self, *a, **k: reads.append(1) or fill(self, *a, **k)
    )
    loader = PortLoader(folder)
    for dtype in DTYPES:
        assert _same_arrays(loader.group(1, dtype=dtype), read_alone[dtype]), dtype
    # bf16 as stored: read once. fp32 stored: its bf16 read rounds (not kept), fp32 is exact.
    assert len(reads) == (1 if stored == torch.bfloat16 else 2)
    # Asked for in bf16 again: the kept bf16 as it is, or (fp32 kept) read: narrower.
    assert _same_arrays(loader.group(1, dtype="bfloat16"), read_alone["bfloat16"])
    loader.group(2, dtype="float32")  # another group: read
    assert len(reads) == (2 if stored == torch.bfloat16 else 4)


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def _same_state(module: torch.nn.Module, expected: dict[str, torch.Tensor]) -> bool:
    got = module.state_dict()
    return got.keys() == expected.keys() and all(
        got[k].dtype == v.dtype and torch.equal(got[k], v) for k, v in expected.items()
    )


@pytest.mark.parametrize("stored", [torch.bfloat16], ids=["bf16"], indirect=True)
def test_reference_casts_reuse_one_buffer_never_under_a_live_block(folder):
    def alone(i, dtype):
        return _state(ReferenceLoader(folder).block(i, dtype=dtype))

    loader = ReferenceLoader(folder)
    first = loader.block(0, dtype="float32")
    expected_first, start = _state(first), min(p.data_ptr() for p in first.parameters())
    second = loader.block(1, dtype="float64")  # the first still lives: cast elsewhere
    assert _same_state(first, expected_first) and _same_state(second, alone(1, "float64"))
    assert min(p.data_ptr() for p in second.parameters()) != start
    del first, second
    third = loader.block(2, dtype="float64")  # the buffer free again: reused, grown
    assert _same_state(third, alone(2, "float64"))
    del third
    fourth = loader.block(2, dtype="float32")
    assert min(p.data_ptr() for p in fourth.parameters()) == loader._casts._bytes.data_ptr()
    assert _same_state(fourth, alone(2, "float32"))
    assert _same_state(loader.block(2, dtype="bfloat16"), alone(2, "bfloat16"))  # as stored


@pytest.mark.parametrize("stored", [torch.bfloat16], ids=["bf16"], indirect=True)
def test_reference_cast_buffer_larger_than_held_bytes_is_freed_with_its_block(folder, monkeypatch):
    monkeypatch.setattr(CastBuffer, "HELD_BYTES", 1024)
    loader = ReferenceLoader(folder)
    block = loader.block(0, dtype="float64")
    assert loader._casts._bytes is None  # held by the block's tensors alone
    assert _same_state(block, _state(ReferenceLoader(folder).block(0, dtype="float64")))


@pytest.mark.parametrize("stored", [torch.bfloat16], ids=["bf16"], indirect=True)
def test_reading_a_block_asks_the_disk_for_it_and_the_next(folder, monkeypatch):
    asked = []
    monkeypatch.setattr(
        os,
        "posix_fadvise",
        lambda fd, offset, length, advice: asked.append(
            (os.readlink(f"/proc/self/fd/{fd}"), offset, length, advice)
        ),
    )
    records = open_folder(folder).tensors

    def expected(layers):
        names = [n for n in records if n.split(".")[:2] in (["layers", str(i)] for i in layers)]
        return sorted((str(records[n].path), records[n].offset, records[n].nbytes) for n in names)

    def got():
        assert all(a[3] == os.POSIX_FADV_WILLNEED for a in asked)
        hints = sorted(a[:3] for a in asked)
        asked.clear()
        return hints

    port, ref = PortLoader(folder), ReferenceLoader(folder)
    port.group(1, dtype="bfloat16")
    assert got() == expected([1, 2])
    port.group(1, dtype="float32")  # cast from the group kept: nothing read
    assert got() == []
    ref.block(2, dtype="bfloat16")
    assert got() == expected([2])  # the last block: no next
    ref.block(2, dtype="float32")  # kept: nothing read
    assert got() == []


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_port_judges_a_prompt_in_one_call_with_the_same_numbers(make_checkpoint, dtype):
    """`JaxRunner.judge` (pieces and free run compiled together) gives every value the
    separate calls give, bit for bit: groups of two blocks (a window pattern), with and
    without a free run."""
    args = tiny_args(n_layers=4, sliding_window=[6, None])
    folder = make_checkpoint(args, seed=11)
    ref, port = TorchRunner(folder, "cpu"), JaxRunner(folder)  # the port reads it too
    rng = np.random.default_rng(0)
    h = rng.standard_normal((9, args.dim)).astype(np.float32)
    group = ref.group(1, dtype)
    values = [ref.trace(group, k, h, 3) for k in range(2)]
    port_group = port.group(1, dtype)
    for free in (h, None):
        together = port.judge(port_group, values, free, 3)
        apart = judge_apart(port, port_group, values, free, 3)
        for got, expected in zip(together[0], apart[0], strict=True):  # each block's pieces
            assert got.keys() == expected.keys()
            for piece, outputs in expected.items():
                assert got[piece].keys() == outputs.keys()
                assert all(np.array_equal(got[piece][o], v) for o, v in outputs.items()), piece
        if free is None:
            assert together[1] is None and apart[1] is None
        else:
            assert all(np.array_equal(a, b) for a, b in zip(together[1], apart[1], strict=True))
