"""`convert_checkpoint`: official folder → sharded safetensors, streaming and atomic.

Tensor names stay the official ones; with dtype "keep" every tensor's bytes are copied as they
are (no decode, no transpose). Output is written into a hidden sibling folder that is renamed to
`out` only when complete, so an interrupted run never leaves anything at `out`.
"""

import dataclasses
import json
import os
import shutil
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from checkpoint.errors import CheckpointError
from checkpoint.folder import INDEX_NAME, CheckpointFolder, open_folder
from checkpoint.tensors import NUMPY_DTYPES, TensorRecord
from checkpoint.tokenizer import Tokenizer
from convert.manifest import sha256_file, write_manifest
from convert.progress import Progress
from convert.safetensors_header import header_bytes
from convert.sharding import parse_size, plan_shards, shard_name
from convert.stream import CHUNK_BYTES, HashingWriter

TARGET_DTYPES = {"keep": None, "bfloat16": "BF16", "float16": "F16", "float32": "F32"}
COPIED_FILES = ("params.json", "tokenizer.model")


@dataclasses.dataclass(frozen=True)
class ConvertSummary:
    out: str
    shards: int
    tensors: int
    tensor_bytes: int
    bytes_written: int
    seconds: float


def convert_checkpoint(
    src: str | Path,
    out: str | Path,
    *,
    max_shard_size: str | int = "5GB",
    dtype: str | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> ConvertSummary:
    """Convert the checkpoint folder `src` into `out`; CheckpointError on bad input.

    `progress` is told the total tensor bytes, then every chunk written.
    """
    start = time.perf_counter()
    src, out = Path(src), Path(out)
    if (dtype or "keep") not in TARGET_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(TARGET_DTYPES)}, got {dtype!r}")
    target = TARGET_DTYPES[dtype or "keep"]
    max_bytes = parse_size(max_shard_size)
    checkpoint = open_folder(src)
    _check_tokenizer(src / "tokenizer.model", checkpoint.args.vocab_size)
    if out.exists() and not overwrite:
        raise CheckpointError(out, "already exists (pass --overwrite to replace it)")
    if out.exists() and not out.is_dir():
        raise CheckpointError(out, "exists and is not a directory")

    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    partial.chmod(0o777 & ~_umask())
    progress = progress or Progress(enabled=False)
    progress.start(sum(_out_nbytes(r, target) for r in checkpoint.tensors.values()))
    try:
        files, shards = _write_folder(checkpoint, partial, target, max_bytes, progress)
        source = {
            "folder": str(src.resolve()),
            "weights": [{"file": p.name, "bytes": p.stat().st_size} for p in checkpoint.weights],
            "dtype": sorted({r.dtype for r in checkpoint.tensors.values()}),
        }
        write_manifest(partial, files, source | {"converted_to": target or "keep"})
        _publish(partial, out)
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
    )


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _check_tokenizer(path: Path, vocab_size: int) -> None:
    pieces = Tokenizer(path).vocab_size
    if pieces != vocab_size:
        raise CheckpointError(
            path, f"vocabulary has {pieces} pieces but params.json vocab_size is {vocab_size}"
        )


def _out_dtype(record: TensorRecord, target: str | None) -> str:
    return target or record.dtype


def _out_nbytes(record: TensorRecord, target: str | None) -> int:
    return (
        record.nbytes
        // NUMPY_DTYPES[record.dtype].itemsize
        * NUMPY_DTYPES[_out_dtype(record, target)].itemsize
    )


def _write_folder(
    checkpoint: CheckpointFolder,
    folder: Path,
    target: str | None,
    max_bytes: int,
    progress: Progress,
) -> tuple[dict[str, dict], int]:
    """Write shards, index and copied files; return {file: {sha256, bytes}} and shard count."""
    records = checkpoint.tensors
    plan = plan_shards({k: _out_nbytes(r, target) for k, r in records.items()}, max_bytes)
    files: dict[str, dict] = {}
    weight_map: dict[str, str] = {}
    with ExitStack() as stack:
        fds = {}
        for path in checkpoint.weights:
            fds[path] = os.open(path, os.O_RDONLY)
            os.posix_fadvise(fds[path], 0, 0, os.POSIX_FADV_SEQUENTIAL)  # as cp: more readahead
            stack.callback(os.close, fds[path])
        for i, names in enumerate(plan):
            name = shard_name(i, len(plan))
            files[name] = _write_shard(
                folder / name, [records[n] for n in names], fds, target, progress
            )
            weight_map |= dict.fromkeys(names, name)
    total = sum(_out_nbytes(r, target) for r in records.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    for name in COPIED_FILES:
        shutil.copyfile(checkpoint.path / name, folder / name)
    for name in (INDEX_NAME, *COPIED_FILES):
        files[name] = {
            "sha256": sha256_file(folder / name),
            "bytes": (folder / name).stat().st_size,
        }
    return files, len(plan)


def _write_shard(
    path: Path,
    records: list[TensorRecord],
    fds: dict[Path, int],
    target: str | None,
    progress: Progress,
) -> dict:
    writer = HashingWriter(path, progress)
    try:
        entries = [
            (r.name, _out_dtype(r, target), r.shape, _out_nbytes(r, target)) for r in records
        ]
        writer.write(header_bytes(entries, {"format": "pt"}))
        for record in records:
            if _out_dtype(record, target) == record.dtype:
                writer.copy_from(fds[record.path], record.offset, record.nbytes)
            else:
                _write_cast(writer, fds[record.path], record, target)
    except BaseException:
        writer.abort()
        raise
    return {"sha256": writer.close(), "bytes": writer.size}


def _write_cast(writer: HashingWriter, fd: int, record: TensorRecord, target: str) -> None:
    """Cast a tensor chunk by chunk (never the whole tensor in memory)."""
    src, dst = NUMPY_DTYPES[record.dtype], NUMPY_DTYPES[target]
    step = max(1, CHUNK_BYTES // src.itemsize)
    numel = record.nbytes // src.itemsize
    for first in range(0, numel, step):
        count = min(step, numel - first)
        raw = os.pread(fd, count * src.itemsize, record.offset + first * src.itemsize)
        values = np.frombuffer(raw, src)
        cast = values.astype(dst)
        if not np.isfinite(cast).all() and np.isfinite(values).all():
            raise CheckpointError(record.path, f"tensor {record.name} overflows {target}")
        writer.write(cast.tobytes())


def _publish(partial: Path, out: Path) -> None:
    """Rename the finished folder to `out`, replacing an existing one only at the last step."""
    if not out.exists():
        partial.rename(out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    out.rename(old / out.name)
    partial.rename(out)
    shutil.rmtree(old, ignore_errors=True)
