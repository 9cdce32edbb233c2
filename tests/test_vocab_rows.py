"""The vocabulary tables read in parts when verify streams (`verify.vocab`): the embeddings for
the prompts' tokens only, the head a slice of rows at a time — each side's shell holding only
those rows, and giving what the whole tables give."""

import dataclasses
from typing import ClassVar

import numpy as np
import pytest
import torch
from support import relative_error, tiny_args

from checkpoint.errors import CheckpointError
from checkpoint.tensors import TensorRecord
from checkpoint.tiny import random_state_dict, write_tiny_checkpoint
from convert.convert import convert_checkpoint
from model_jax.loading import PortLoader
from reference_torch import loading
from reference_torch.loading import ReferenceLoader, _SafetensorsState
from verify import vocab
from verify.runners import JaxRunner, TorchRunner, _vocab_rows

ARGS = tiny_args(vocab_size=32000)  # a real tokenizer's: the folders convert
ROWS = 4096  # read 4096 rows at a time: 7 slices of 4096 rows and one of 3328
PROMPTS = [[1, 31999, 17, 17, 300], [4096, 4095, 2, 31998]]  # a repeat; the last rows


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def folders(request, tmp_path_factory):
    args = dataclasses.replace(ARGS, tied_embeddings=request.param)
    root = tmp_path_factory.mktemp("vocab")
    state = random_state_dict(args, seed=3)
    for fmt in ("pth", "safetensors"):
        write_tiny_checkpoint(root / fmt, args, state=state, weights_format=fmt)
    convert_checkpoint(root / "safetensors", root / "out")
    return root


def _states(n: int = 5) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.standard_normal((n, ARGS.dim)).astype(np.float32) * 3 for _ in range(2)]


def _in_parts(runner):
    """The runner reading its tables in parts of `ROWS` rows."""
    runner.vocab_rows = ROWS
    return runner


class _Recording(np.ndarray):
    """A file mapping that records how it is read: indexed (the key) or reshaped whole."""

    reads: ClassVar[list] = []

    def __getitem__(self, key):
        self.reads.append(key)
        return self.view(np.ndarray)[key]

    def reshape(self, *shape, **kwargs):
        self.reads.append("whole")
        return self.view(np.ndarray).reshape(*shape, **kwargs)


def test_a_shell_reads_only_the_rows_it_is_asked_for(folders, monkeypatch):
    rows, table = [2, 3, 4, 300, 31999], "tok_embeddings.weight"
    asked, get = [], _SafetensorsState.__getitem__
    monkeypatch.setattr(
        _SafetensorsState, "__getitem__", lambda self, n: asked.append(n) or get(self, n)
    )
    for fmt in ("pth", "safetensors"):
        loader = ReferenceLoader(folders / fmt)
        whole = loader.shell("embed", dtype="float32").tok_embeddings.weight
        asked.clear()
        narrow = loader.shell("embed", dtype="float32", rows=rows).tok_embeddings.weight
        assert torch.equal(narrow, whole[rows]) and table not in asked, fmt

    array = TensorRecord.array
    monkeypatch.setattr(
        TensorRecord,
        "array",
        lambda self: array(self).view(_Recording) if self.name == table else array(self),
    )
    port = PortLoader(folders / "out")
    whole = np.asarray(port.shell("embed", dtype="float32").tok_embeddings.weight)
    _Recording.reads.clear()
    narrow = np.asarray(port.shell("embed", dtype="float32", rows=rows).tok_embeddings.weight)
    np.testing.assert_array_equal(narrow, whole[rows])
    assert [list(key) for key in _Recording.reads] == [rows]  # one read, of these rows
    _Recording.reads.clear()
    head = port.shell("head", dtype="float32", rows=list(range(4090, 4100)))
    weight = (head.tok_embeddings if head.output is None else head.output).weight
    assert weight.shape == (10, ARGS.dim)
    if head.output is None:  # tied: the embeddings, read as one slice of the file's mapping
        assert _Recording.reads == [slice(4090, 4100)]


def _both(whole, parts, dtype: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """The two runners' logits over the same states, after checking that their embeddings
    and final norms are the same bits."""
    embedded = [vocab.embed_prompts(r, dtype, PROMPTS) for r in (whole, parts)]
    for a, b in zip(*embedded, strict=True):
        np.testing.assert_array_equal(a, b)
    states = _states()
    heads = [vocab.head_states(r, dtype, states) for r in (whole, parts)]
    pairs = []
    for (normed, logits), (normed_p, logits_p) in zip(*heads, strict=True):
        np.testing.assert_array_equal(normed, normed_p)
        assert logits_p.shape == (len(normed), ARGS.vocab_size)
        pairs.append((logits, logits_p))
    return pairs


@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "float64"])
def test_the_reference_in_parts_gives_the_whole_tables_numbers(folders, dtype):
    """Embeddings the same bits; logits the same bits in bf16 and fp32 (each logit is one row's
    dot product, summed alike in a narrower matmul), float64 within its own rounding."""
    parts = _in_parts(TorchRunner(folders / "pth", "cpu"))
    for logits, logits_p in _both(TorchRunner(folders / "pth", "cpu"), parts, dtype):
        if dtype == "float64":
            assert relative_error(logits_p, logits) <= 1e-14
        else:
            np.testing.assert_array_equal(logits, logits_p)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_the_port_in_parts_gives_the_whole_tables_numbers(folders, dtype):
    """Embeddings the same bits; logits within one rounding of the dtype (XLA may block a
    narrower matmul's sums differently: fp32 over dim = 64 terms ≤ 1e-6 of the largest logit,
    bf16 one unit in the last place, 2^-8)."""
    bound = 1e-6 if dtype == "float32" else 2**-8
    parts = _in_parts(JaxRunner(folders / "out"))
    for logits, logits_p in _both(JaxRunner(folders / "out"), parts, dtype):
        assert relative_error(logits_p, logits) <= bound


def test_a_large_head_is_read_in_slices_within_the_budget():
    seven_b = tiny_args(dim=4096, vocab_size=32768)
    assert vocab.head_rows(seven_b) == seven_b.vocab_size  # 1 GiB in float64: read whole
    large3 = tiny_args(dim=7168, vocab_size=131072)
    rows = vocab.head_rows(large3)
    assert rows % vocab.ROW_MULTIPLE == 0 and 8 * large3.dim * rows <= vocab.HEAD_BYTES
    assert rows > vocab.HEAD_BYTES // (8 * large3.dim) - vocab.ROW_MULTIPLE


def test_a_table_stored_in_fp8_is_read_whole():
    """Its scales (per tensor, per row or per block) are read with it: neither loader reads
    its rows alone, so a streamed runner keeps it whole."""
    assert _vocab_rows(ARGS, (), streamed=True) == ARGS.vocab_size
    assert _vocab_rows(ARGS, ("output.weight",), streamed=True) is None
    assert _vocab_rows(ARGS, ("layers.0.attention.wq.weight",), streamed=False) is None


def test_a_nan_in_a_row_no_prompt_reads_is_still_found(tmp_path, monkeypatch):
    """The reference checks a table read by rows whole on its first read, a part at a time."""
    monkeypatch.setattr(loading, "CHECK_ELEMENTS", 7 * ARGS.dim)  # parts of 7 rows
    state = random_state_dict(ARGS, seed=3)
    state["tok_embeddings.weight"][20000, 5] = float("nan")
    folder = write_tiny_checkpoint(tmp_path, ARGS, state=state, weights_format="safetensors")
    with pytest.raises(CheckpointError, match=r"tok_embeddings\.weight is not finite"):
        ReferenceLoader(folder).shell("embed", dtype="float32", rows=[1, 2, 3])
