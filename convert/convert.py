"""`convert_checkpoint`: an official or HF folder → sharded safetensors with the official
tensor names (for the JAX model) or an HF transformers folder; streaming and atomic.

In the JAX layout tensor names stay the official ones; with dtype "keep" every tensor's bytes
are copied as they are (no decode, no transpose). Output is written into a hidden sibling
folder that is renamed to `out` only when complete, so an interrupted run never leaves anything
at `out`.

Beside the text decoder a folder may hold (`checkpoint.spec.classify`):

- vision tensors (params.json `vision_encoder` / `multimodal`): carried byte for byte whatever
  the dtype, params.json copied as is; `text_only` leaves them out and writes params.json
  without those keys; the HF export (the text model) leaves them out;
- FP8 weights with their scales (`quantization`): with dtype "keep" every byte is copied and
  every FP8 byte checked for NaN on the way; with a target dtype (and always in the HF export)
  each FP8 weight is dequantized (float32(fp8) × float32(scale), rounded once) and the weight,
  activation and fake-quantizer scales are left out, params.json written without
  `quantization`.

The manifest's `contents` says what was carried, dequantized and left out, and why: nothing
is dropped silently.

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

from checkpoint.errors import CheckpointError, read_json, reading
from checkpoint.folder import INDEX_NAME
from checkpoint.hf import hf_config
from checkpoint.spec import FP8
from checkpoint.tensors import NUMPY_DTYPES, TensorRecord
from checkpoint.tokenizer import Tokenizer
from convert import fp8
from convert.hub import hub_folder, is_repo_id
from convert.manifest import sha256_file, write_manifest
from convert.plan import Plan, Planned, Stacked, plan_output, torch_dtype_of
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
from convert.sources import Source, open_source
from convert.stream import CHUNK_BYTES, HashingWriter, SourceEnded, read_exactly

# "keep" (copy every tensor as it is), or a name of the one dtype vocabulary
# (checkpoint.dtypes.DTYPE_NAMES, not imported: it would load torch into every conversion).
TARGET_DTYPES = {"keep": None, "bfloat16": "BF16", "float16": "F16", "float32": "F32"}
LAYOUTS = ("official", "hf")


# Whether keep-mode copies check every FP8 byte for NaN (benchmarks turn it off to measure it).
CHECK_FP8_BYTES = True


@dataclasses.dataclass(frozen=True)
class ConvertSummary:
    out: str
    shards: int
    tensors: int
    tensor_bytes: int
    bytes_written: int
    seconds: float
    notes: tuple[str, ...] = ()  # leftovers of earlier runs it could not attribute
    carried: int = 0  # vision tensors copied byte for byte
    dequantized: int = 0  # FP8 weights written dequantized
    left_out: tuple[tuple[str, int], ...] = ()  # (why, how many tensors)


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
    text_only: bool = False,
    progress: Progress | None = None,
) -> ConvertSummary:
    """Convert the checkpoint `src` into `out`; CheckpointError on bad input.

    `src` is an official folder, an HF transformers folder, or a hub repo id (`org/name`, only
    the needed files fetched, `convert.hub`); `layout` "official" writes official names (byte
    copies), "hf" writes HF names, config.json and wq/wk permuted for rotate_half.
    `text_only` leaves a vision encoder out (and its keys out of params.json).
    `progress` is told the total tensor bytes, then every chunk written.
    """
    options = _Options(max_shard_size, dtype, overwrite, layout, text_only)
    if isinstance(src, str) and is_repo_id(src):
        with hub_folder(src) as (folder, commit):
            origin = {"hub_repo": src, "revision": commit}
            return _convert(folder, Path(out), origin, options, progress)
    src = Path(src)
    origin = {"folder": str(src.resolve())}
    return _convert(src, Path(out), origin, options, progress)


@dataclasses.dataclass(frozen=True)
class _Options:
    max_shard_size: str | int
    dtype: str | None
    overwrite: bool
    layout: str
    text_only: bool


def _convert(
    src: Path, out: Path, origin: dict, options: _Options, progress: Progress | None
) -> ConvertSummary:
    start = time.perf_counter()
    dtype, layout, overwrite = options.dtype, options.layout, options.overwrite
    if (dtype or "keep") not in TARGET_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(TARGET_DTYPES)}, got {dtype!r}")
    target = TARGET_DTYPES[dtype or "keep"]
    try:
        max_bytes = parse_size(options.max_shard_size)
    except ValueError as err:
        raise ValueError(f"--max-shard-size: {err}") from None
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    check_destination(None if "hub_repo" in origin else src, out, overwrite)
    checkpoint = open_source(src)
    params_file = _params_file(src, checkpoint.layout)
    tokenizer = Tokenizer.from_folder(src)
    tokenizer.check_vocab(checkpoint.args.vocab_size, params_file)
    plan = plan_output(checkpoint, layout, target, options.text_only)
    config = None
    if layout == "hf":  # refused now, before anything is written
        try:
            config = hf_config(checkpoint.args, torch_dtype_of(plan.tensors))
        except ValueError as err:
            raise CheckpointError(params_file, f"--format hf: {err}") from None
    watch = SourceWatch([*checkpoint.weights, params_file, tokenizer.path])

    out.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(out):
        notes = remove_leftovers(out)
        check_destination(None, out, overwrite)  # again, now that no other run can race us
        partial = new_partial(out)
        progress = progress or Progress(enabled=False)
        progress.start(sum(p.nbytes for p in plan.tensors))
        try:
            files, shards = _write_folder(
                checkpoint, plan, config, tokenizer.path, partial, max_bytes, progress, watch
            )
            source = origin | {
                "layout": checkpoint.layout,
                "weights": [
                    {"file": p.name, "bytes": p.stat().st_size} for p in checkpoint.weights
                ],
                "dtype": sorted({r.dtype for r in checkpoint.tensors.values()}),
            }
            write_manifest(
                partial,
                files,
                source | {"converted_to": target or "keep"},
                layout,
                plan.contents,
            )
            publish(partial, out)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    progress.finish()
    written = sum(f["bytes"] for f in files.values())
    return ConvertSummary(
        str(out),
        shards,
        len(plan.tensors),
        progress.total,
        written,
        time.perf_counter() - start,
        tuple(notes),
        carried=len(plan.contents.get("carried", {}).get("tensors", [])),
        dequantized=len(plan.contents.get("dequantized", {}).get("tensors", [])),
        left_out=tuple((g["why"], len(g["tensors"])) for g in plan.contents["left_out"]),
    )


def _params_file(src: Path, layout: str) -> Path:
    return src / ("config.json" if layout == "hf" else "params.json")


def _write_folder(
    checkpoint: Source,
    plan: Plan,
    config: dict | None,
    tokenizer: Path,
    folder: Path,
    max_bytes: int,
    progress: Progress,
    watch: SourceWatch,
) -> tuple[dict[str, dict], int]:
    """Write shards, index and the small files; return {file: {sha256, bytes}}, shard count.
    CheckpointError naming a source file that changed while it was read, or a bad scale or FP8
    weight."""
    planned = {p.name: p for p in plan.tensors}
    shards = plan_shards({k: p.nbytes for k, p in planned.items()}, max_bytes)
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
        scales = _read_scales(checkpoint, plan, fds)  # refused before any shard is written
        for i, names in enumerate(shards):
            name = shard_name(i, len(shards))
            files[name] = _write_shard(
                folder / name, [planned[n] for n in names], fds, scales, progress
            )
            weight_map |= dict.fromkeys(names, name)
        small = _write_small_files(checkpoint, plan, config, tokenizer, folder)
        watch.check_unchanged(fds)  # what was copied is what the run started from
    total = sum(p.nbytes for p in planned.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    for name in (INDEX_NAME, *small):
        files[name] = {
            "sha256": sha256_file(folder / name),
            "bytes": (folder / name).stat().st_size,
        }
    return files, len(shards)


def _read_scales(
    checkpoint: Source, plan: Plan, fds: dict[Path, int]
) -> dict[str, fp8.WeightScale]:
    """Every scale the run uses (to dequantize) or copies, read and checked finite; returns
    those used, as float32. CheckpointError naming the first one that is not finite."""
    roles = checkpoint.roles
    used = {part.scale for p in plan.tensors for part in p.parts if part.scale}
    copied = {p.name for p in plan.tensors} & {
        *roles.weight_scales,
        *roles.activation_scales,
        *roles.unused,
    }
    scales = {}
    for name in [n for n in checkpoint.tensors if n in used | copied]:
        record = checkpoint.tensors[name]
        try:
            values = _read(fds[record.path], record)
        except SourceEnded as err:
            raise CheckpointError(record.path, str(err)) from None
        values = fp8.checked_scale(values, record, roles.weight_scales.get(name))
        if name in used:
            scales[name] = fp8.WeightScale(values, checkpoint.args.fp8_block)
    return scales


def _write_small_files(
    checkpoint: Source, plan: Plan, config: dict | None, tokenizer: Path, folder: Path
) -> tuple[str, str]:
    """The tokenizer (under its own name) and params.json (official) or config.json (hf);
    returns their names."""
    shutil.copyfile(tokenizer, folder / tokenizer.name)
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        return ("config.json", tokenizer.name)
    if checkpoint.layout != "official":
        plan.args.to_json(folder / "params.json")
    elif plan.params_removed:  # the source's keys, in its order, less those left out
        params = read_json(checkpoint.path / "params.json")
        kept = {k: v for k, v in params.items() if k not in plan.params_removed}
        (folder / "params.json").write_text(json.dumps(kept, indent=2) + "\n")
    else:
        shutil.copyfile(checkpoint.path / "params.json", folder / "params.json")
    return ("params.json", tokenizer.name)


def _write_shard(
    path: Path,
    planned: list[Planned | Stacked],
    fds: dict[Path, int],
    scales: dict[str, fp8.WeightScale],
    progress: Progress,
) -> dict:
    writer = HashingWriter(path, progress)
    try:
        entries = [(p.name, p.out_dtype, p.shape, p.nbytes) for p in planned]
        writer.write(header_bytes(entries, {"format": "pt"}))
        for part in (part for p in planned for part in p.parts):
            try:
                _write_tensor(writer, part, fds[part.record.path], scales)
            except SourceEnded as err:
                raise CheckpointError(part.record.path, str(err)) from None
    except BaseException:
        writer.abort()
        raise
    return {"sha256": writer.close(), "bytes": writer.size}


def _write_tensor(
    writer: HashingWriter, p: Planned, fd: int, scales: dict[str, fp8.WeightScale]
) -> None:
    """One source tensor as planned: copied, cast, dequantized and/or transformed."""
    record = p.record
    if p.scale is not None and p.transform is None:
        _write_dequantized(writer, fd, p, scales[p.scale])
    elif p.transform is not None or p.scale is not None:
        array = _read(fd, record)
        if p.scale is not None:
            array = fp8.dequantize(array.view(np.uint8), scales[p.scale], record)
        if p.transform is not None:
            array = p.transform(array)
        array = _cast(array, record, p.out_dtype)
        writer.write(np.ascontiguousarray(array).tobytes())
    elif p.out_dtype == record.dtype:
        check = record.dtype == FP8 and CHECK_FP8_BYTES
        inspect = fp8.nan_inspector(record) if check else None
        writer.copy_from(fd, record.offset, record.nbytes, inspect)
    else:
        _write_cast(writer, fd, record, p.out_dtype)


def _write_dequantized(
    writer: HashingWriter, fd: int, planned: Planned, scale: fp8.WeightScale
) -> None:
    """Dequantize an FP8 weight a few rows at a time (never the whole tensor in memory); each
    chunk is hashed on the second thread while the next is made."""
    record = planned.record
    rows, cols = record.shape
    out_dtype = NUMPY_DTYPES[planned.out_dtype]
    # Rows per step: ≤ 16 MiB of output, of which the writer holds at most IN_FLIGHT + 1.
    step = max(1, CHUNK_BYTES // max(cols * out_dtype.itemsize, 1))
    raw = np.empty(min(step, rows) * cols, np.uint8)
    for first in range(0, rows, step):
        n = min(step, rows - first)
        chunk = raw[: n * cols].reshape(n, cols)
        read_exactly(fd, memoryview(raw[: n * cols]), record.offset + first * cols)
        out = np.empty((n, cols), out_dtype)  # handed to the writer, never reused
        part = fp8.first_nan(chunk)
        if part is not None:
            raise fp8.nan_error(record, first * cols + part)
        fp8.dequantize_into(chunk, scale.rows(first, n, record.shape), out, record)
        writer.write_owned(memoryview(out.reshape(-1).view(np.uint8)))


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


def _cast(values: np.ndarray, record: TensorRecord, target: str) -> np.ndarray:
    """`values` in the target dtype; CheckpointError if finite values overflow it."""
    if values.dtype == NUMPY_DTYPES[target]:
        return values
    cast = values.astype(NUMPY_DTYPES[target])
    if not np.isfinite(cast).all() and np.isfinite(values).all():
        raise CheckpointError(record.path, f"tensor {record.name} overflows {target}")
    return cast
