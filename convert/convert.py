"""`convert_checkpoint`: an official or HF folder → sharded safetensors with the official
tensor names (for the JAX model) or an HF transformers folder; streaming and atomic.

In the JAX layout tensor names stay the official ones; with dtype "keep" every tensor's bytes
are copied as they are (no decode, no transpose). Output is written into a hidden sibling
folder that is renamed to `out` only when complete, so an interrupted run never leaves anything
at `out`.

Every source file is read with plain reads (never mapped), and its identity (device, inode,
size, modification time) is taken when the source is opened and compared again once everything
is written: a file truncated, rewritten or replaced meanwhile is a CheckpointError naming it,
and the partial output is removed.
"""

import dataclasses
import json
import os
import shutil
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from checkpoint.errors import CheckpointError, reading
from checkpoint.folder import INDEX_NAME
from checkpoint.hf import hf_config, interleaved_to_halves, rotary_heads, to_hf_name
from checkpoint.tensors import NUMPY_DTYPES, TensorRecord
from checkpoint.tokenizer import Tokenizer
from convert.hub import hub_folder, is_repo_id
from convert.manifest import sha256_file, write_manifest
from convert.progress import Progress
from convert.publish import (
    check_destination,
    new_partial,
    output_lock,
    publish,
    remove_leftovers,
)
from convert.safetensors_header import header_bytes
from convert.shard_files import parse_size, plan_shards, shard_name
from convert.sources import Source, Transform, open_source
from convert.stream import CHUNK_BYTES, HashingWriter, SourceEnded, read_exactly

# "keep" (copy every tensor as it is), or a name of the one dtype vocabulary
# (checkpoint.dtypes.DTYPE_NAMES, not imported: it would load torch into every conversion).
TARGET_DTYPES = {"keep": None, "bfloat16": "BF16", "float16": "F16", "float32": "F32"}
LAYOUTS = ("official", "hf")


@dataclasses.dataclass(frozen=True)
class ConvertSummary:
    out: str
    shards: int
    tensors: int
    tensor_bytes: int
    bytes_written: int
    seconds: float
    notes: tuple[str, ...] = ()  # leftovers of earlier runs it could not attribute


class SourceWatch:
    """Each source file's identity when the conversion started, checked again at the end: one
    truncated, rewritten or replaced meanwhile (the copy would mix two versions, or the params
    read would not be the ones written) is a CheckpointError naming it."""

    def __init__(self, paths: list[Path]):
        self.seen = {}
        for path in dict.fromkeys(paths):
            with reading(path):
                self.seen[path] = os.stat(path)

    def check_opened(self, path: Path, fd: int) -> None:
        """The file just opened is the one whose table was read."""
        self._compare(path, os.fstat(fd), replaced="replaced after its header was read")

    def check_unchanged(self, fds: dict[Path, int]) -> None:
        for path in self.seen:
            if path in fds:  # the file read from: not cut or rewritten in place
                self._compare(path, os.fstat(fds[path]), replaced="replaced while being read")
            try:
                with reading(path):
                    now = os.stat(path)
            except CheckpointError:
                raise CheckpointError(path, "removed or unreadable since the start") from None
            self._compare(path, now, replaced="replaced while being read")

    def _compare(self, path: Path, now: os.stat_result, *, replaced: str) -> None:
        before = self.seen[path]
        if (now.st_dev, now.st_ino) != (before.st_dev, before.st_ino):
            raise CheckpointError(path, f"{replaced} (another file is at its path now)")
        if now.st_size != before.st_size:
            raise CheckpointError(
                path,
                f"changed while being read (size {before.st_size} bytes, now {now.st_size})",
            )
        if now.st_mtime_ns != before.st_mtime_ns:
            raise CheckpointError(path, "changed while being read (modified since the start)")


def convert_checkpoint(
    src: str | Path,
    out: str | Path,
    *,
    max_shard_size: str | int = "5GB",
    dtype: str | None = None,
    overwrite: bool = False,
    layout: str = "official",
    progress: Progress | None = None,
) -> ConvertSummary:
    """Convert the checkpoint `src` into `out`; CheckpointError on bad input.

    `src` is an official folder, an HF transformers folder, or a hub repo id (`org/name`, only
    the needed files fetched, `convert.hub`); `layout` "official" writes official names (byte
    copies), "hf" writes HF names, config.json and wq/wk permuted for rotate_half.
    `progress` is told the total tensor bytes, then every chunk written.
    """
    if isinstance(src, str) and is_repo_id(src):
        with hub_folder(src) as (folder, commit):
            origin = {"hub_repo": src, "revision": commit}
            return _convert(
                folder, Path(out), origin, max_shard_size, dtype, overwrite, layout, progress
            )
    src = Path(src)
    origin = {"folder": str(src.resolve())}
    return _convert(src, Path(out), origin, max_shard_size, dtype, overwrite, layout, progress)


def _convert(
    src: Path,
    out: Path,
    origin: dict,
    max_shard_size: str | int,
    dtype: str | None,
    overwrite: bool,
    layout: str,
    progress: Progress | None,
) -> ConvertSummary:
    start = time.perf_counter()
    if (dtype or "keep") not in TARGET_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(TARGET_DTYPES)}, got {dtype!r}")
    target = TARGET_DTYPES[dtype or "keep"]
    try:
        max_bytes = parse_size(max_shard_size)
    except ValueError as err:
        raise ValueError(f"--max-shard-size: {err}") from None
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    check_destination(None if "hub_repo" in origin else src, out, overwrite)
    checkpoint = open_source(src)
    tokenizer = Tokenizer.from_folder(src)
    tokenizer.check_vocab(checkpoint.args.vocab_size, _params_file(src, checkpoint.layout))
    watch = SourceWatch([*checkpoint.weights, _params_file(src, checkpoint.layout), tokenizer.path])

    out.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(out):
        notes = remove_leftovers(out)
        check_destination(None, out, overwrite)  # again, now that no other run can race us
        partial = new_partial(out)
        progress = progress or Progress(enabled=False)
        progress.start(sum(_out_nbytes(r, target) for r in checkpoint.tensors.values()))
        try:
            files, shards = _write_folder(
                checkpoint, tokenizer.path, partial, target, max_bytes, layout, progress, watch
            )
            source = origin | {
                "layout": checkpoint.layout,
                "weights": [
                    {"file": p.name, "bytes": p.stat().st_size} for p in checkpoint.weights
                ],
                "dtype": sorted({r.dtype for r in checkpoint.tensors.values()}),
            }
            write_manifest(partial, files, source | {"converted_to": target or "keep"}, layout)
            publish(partial, out)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    progress.finish()
    written = sum(f["bytes"] for f in files.values())
    return ConvertSummary(
        str(out),
        shards,
        len(checkpoint.tensors),
        progress.total,
        written,
        time.perf_counter() - start,
        tuple(notes),
    )


def _params_file(src: Path, layout: str) -> Path:
    return src / ("config.json" if layout == "hf" else "params.json")


def _out_dtype(record: TensorRecord, target: str | None) -> str:
    return target or record.dtype


def _out_nbytes(record: TensorRecord, target: str | None) -> int:
    return (
        record.nbytes
        // NUMPY_DTYPES[record.dtype].itemsize
        * NUMPY_DTYPES[_out_dtype(record, target)].itemsize
    )


@dataclasses.dataclass(frozen=True)
class _Planned:
    """One output tensor: its name, where its bytes come from, and what to do to them."""

    name: str
    record: TensorRecord
    transform: Transform | None  # None: the bytes are copied (or cast) as they are


def _plan(checkpoint: Source, layout: str) -> list[_Planned]:
    planned = []
    for name, record in checkpoint.tensors.items():
        fix = checkpoint.transforms.get(name)
        if layout == "official":
            planned.append(_Planned(name, record, fix))
            continue
        heads = rotary_heads(name, checkpoint.args)
        transform = fix
        if heads:

            def transform(w, fix=fix, heads=heads):
                return interleaved_to_halves(fix(w) if fix else w, heads)

        planned.append(_Planned(to_hf_name(name), record, transform))
    return planned


def _write_folder(
    checkpoint: Source,
    tokenizer: Path,
    folder: Path,
    target: str | None,
    max_bytes: int,
    layout: str,
    progress: Progress,
    watch: SourceWatch,
) -> tuple[dict[str, dict], int]:
    """Write shards, index and the small files; return {file: {sha256, bytes}}, shard count.
    CheckpointError naming a source file that changed while it was read."""
    planned = {p.name: p for p in _plan(checkpoint, layout)}
    plan = plan_shards({k: _out_nbytes(p.record, target) for k, p in planned.items()}, max_bytes)
    files: dict[str, dict] = {}
    weight_map: dict[str, str] = {}
    with ExitStack() as stack:
        fds = {}
        for path in checkpoint.weights:
            fds[path] = os.open(path, os.O_RDONLY)
            stack.callback(os.close, fds[path])
            watch.check_opened(path, fds[path])
            if hasattr(os, "posix_fadvise"):  # Linux: as cp, ask for more readahead
                os.posix_fadvise(fds[path], 0, 0, os.POSIX_FADV_SEQUENTIAL)
        for i, names in enumerate(plan):
            name = shard_name(i, len(plan))
            files[name] = _write_shard(
                folder / name, [planned[n] for n in names], fds, target, progress
            )
            weight_map |= dict.fromkeys(names, name)
        small = _write_small_files(checkpoint, tokenizer, folder, target, layout)
        watch.check_unchanged(fds)  # what was copied is what the run started from
    total = sum(_out_nbytes(p.record, target) for p in planned.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    for name in (INDEX_NAME, *small):
        files[name] = {
            "sha256": sha256_file(folder / name),
            "bytes": (folder / name).stat().st_size,
        }
    return files, len(plan)


def _write_small_files(
    checkpoint: Source, tokenizer: Path, folder: Path, target: str | None, layout: str
) -> tuple[str, str]:
    """The tokenizer (under its own name) and params.json (official) or config.json (hf);
    returns their names."""
    shutil.copyfile(tokenizer, folder / tokenizer.name)
    if layout == "hf":
        dtypes = {_out_dtype(r, target) for r in checkpoint.tensors.values()}
        torch_dtype = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}.get(
            dtypes.pop() if len(dtypes) == 1 else "", "float32"
        )
        config = hf_config(checkpoint.args, torch_dtype)
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        return ("config.json", tokenizer.name)
    if checkpoint.layout == "official":
        shutil.copyfile(checkpoint.path / "params.json", folder / "params.json")
    else:
        checkpoint.args.to_json(folder / "params.json")
    return ("params.json", tokenizer.name)


def _write_shard(
    path: Path,
    planned: list[_Planned],
    fds: dict[Path, int],
    target: str | None,
    progress: Progress,
) -> dict:
    writer = HashingWriter(path, progress)
    try:
        entries = [
            (p.name, _out_dtype(p.record, target), p.record.shape, _out_nbytes(p.record, target))
            for p in planned
        ]
        writer.write(header_bytes(entries, {"format": "pt"}))
        for p in planned:
            record = p.record
            try:
                if p.transform is not None:
                    array = _cast(p.transform(_read(fds[record.path], record)), record, target)
                    writer.write(np.ascontiguousarray(array).tobytes())
                elif _out_dtype(record, target) == record.dtype:
                    writer.copy_from(fds[record.path], record.offset, record.nbytes)
                else:
                    _write_cast(writer, fds[record.path], record, target)
            except SourceEnded as err:
                raise CheckpointError(record.path, str(err)) from None
    except BaseException:
        writer.abort()
        raise
    return {"sha256": writer.close(), "bytes": writer.size}


def _write_cast(writer: HashingWriter, fd: int, record: TensorRecord, target: str) -> None:
    """Cast a tensor chunk by chunk (never the whole tensor in memory)."""
    src = NUMPY_DTYPES[record.dtype]
    step = max(1, CHUNK_BYTES // src.itemsize)
    numel = record.nbytes // src.itemsize
    for first in range(0, numel, step):
        count = min(step, numel - first)
        values = np.empty(count, src)
        read_exactly(fd, memoryview(values.view(np.uint8)), record.offset + first * src.itemsize)
        writer.write(_cast(values, record, target).tobytes())


def _read(fd: int, record: TensorRecord) -> np.ndarray:
    """The whole tensor, read (not mapped) from the open file `fd`; SourceEnded if it ends."""
    values = np.empty(record.shape, NUMPY_DTYPES[record.dtype])
    read_exactly(fd, memoryview(values.reshape(-1).view(np.uint8)), record.offset)
    return values


def _cast(values: np.ndarray, record: TensorRecord, target: str | None) -> np.ndarray:
    """`values` in the target dtype; CheckpointError if finite values overflow it."""
    if target is None or target == record.dtype:
        return values
    cast = values.astype(NUMPY_DTYPES[target])
    if not np.isfinite(cast).all() and np.isfinite(values).all():
        raise CheckpointError(record.path, f"tensor {record.name} overflows {target}")
    return cast
