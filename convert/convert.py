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

from checkpoint.args import ModelArgs
from checkpoint.errors import CheckpointError, read_json, reading
from checkpoint.folder import INDEX_NAME
from checkpoint.hf import hf_config, interleaved_to_halves, rotary_heads, to_hf_name
from checkpoint.hf_mistral4 import stacked_experts
from checkpoint.spec import FP8
from checkpoint.tensors import NUMPY_DTYPES, TensorRecord
from checkpoint.tokenizer import Tokenizer
from convert import fp8
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


# Whether keep-mode copies check every FP8 byte for NaN (benchmarks turn it off to measure it).
CHECK_FP8_BYTES = True
# Why tensors are left out or carried, as the manifest says it.
WHY_TEXT_ONLY = "--text-only: the vision encoder is not part of the text model"
WHY_HF_TEXT = (
    "--format hf exports the text model (transformers' *ForCausalLM); the vision encoder is "
    "not part of it"
)
WHY_DEQUANTIZED = "the FP8 weights were dequantized: their scales mean nothing to the result"
WHY_CARRIED = (
    "vision encoder (params.json declares one): copied byte for byte whatever the dtype; "
    "no model of this toolkit loads it"
)
WHY_UNUSED = "FP8 attention fake-quantizer scales: copied byte for byte, unused by these models"
HOW_DEQUANTIZED = (
    "float32(fp8) × float32(qscale_weight) (a per-row scale multiplies its row; a block "
    "weight_scale its block), rounded once to the target dtype"
)
# params.json keys the HF export cannot carry, and why.
NOT_EXPORTED = {
    "quantization": "the FP8 weights are dequantized",
    "quantization_config": "the FP8 weights are dequantized",
    "vision_encoder": "the text model only",
    "multimodal": "the text model only",
    "max_seq_len": "a runtime length; transformers has no such key",
}


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
    plan = _plan(checkpoint, layout, target, options.text_only)
    config = None
    if layout == "hf":  # refused now, before anything is written
        try:
            config = hf_config(checkpoint.args, _torch_dtype(plan.tensors))
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


@dataclasses.dataclass(frozen=True)
class _Planned:
    """One output tensor: its name, where its bytes come from, and what to do to them."""

    name: str
    record: TensorRecord
    out_dtype: str
    transform: Transform | None = None  # applied to the whole array (HF wq/wk rows)
    scale: str | None = None  # an FP8 weight dequantized with this scale tensor first

    @property
    def nbytes(self) -> int:
        count = self.record.nbytes // NUMPY_DTYPES[self.record.dtype].itemsize
        return count * NUMPY_DTYPES[self.out_dtype].itemsize

    @property
    def shape(self) -> tuple[int, ...]:
        return self.record.shape

    @property
    def parts(self) -> tuple["_Planned", ...]:
        return (self,)


@dataclasses.dataclass(frozen=True)
class _Stacked:
    """One output tensor written as planned tensors back to back (HF Mistral4's stacked
    experts): one part's chunk in memory at a time, never the whole tensor."""

    name: str
    shape: tuple[int, ...]
    parts: tuple[_Planned, ...]

    @property
    def out_dtype(self) -> str:
        return self.parts[0].out_dtype

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)


@dataclasses.dataclass(frozen=True)
class _Plan:
    tensors: list[_Planned | _Stacked]  # what OUT holds, in order
    args: ModelArgs  # the model OUT describes (without what was left out)
    params_removed: tuple[str, ...]  # top-level params.json keys left out
    contents: dict  # the manifest's account of it


def _plan(checkpoint: Source, layout: str, target: str | None, text_only: bool) -> _Plan:
    """What to write for each source tensor, and the account of what is carried, dequantized
    and left out."""
    roles, args = checkpoint.roles, checkpoint.args
    scale_of = {weight: scale for scale, weight in roles.weight_scales.items()}
    scales = {*roles.weight_scales, *roles.activation_scales, *roles.unused}
    # The HF export is always dequantized (transformers' Ministral3 has no FP8 of this form).
    dequantize = (layout == "hf" or target is not None) and (
        args.quantization is not None or args.quantization_config is not None or bool(scales)
    )
    drop_vision = layout == "hf" or text_only
    vision_why = WHY_HF_TEXT if layout == "hf" else WHY_TEXT_ONLY
    carried_names = set(roles.carried)
    planned: list[_Planned] = []
    left_out: dict[str, list[str]] = {}
    groups: dict[str, list[str]] = {"carried": [], "unused": [], "dequantized": [], "fp8": []}
    text = 0
    for name, record in checkpoint.tensors.items():
        fix = checkpoint.transforms.get(name)
        if name in carried_names:
            if drop_vision:
                left_out.setdefault(vision_why, []).append(name)
            else:
                planned.append(_Planned(name, record, record.dtype))  # byte for byte
                groups["carried"].append(name)
            continue
        if name in scales:
            if dequantize:
                left_out.setdefault(WHY_DEQUANTIZED, []).append(name)
            else:
                planned.append(_Planned(name, record, record.dtype))
                groups["unused" if name in roles.unused else "fp8"].append(name)
            continue
        text += 1
        scale = scale_of.get(name) if dequantize else None
        out_dtype = target or ("BF16" if scale else record.dtype)
        if scale:
            groups["dequantized"].append(name)
        elif record.dtype == FP8:
            groups["fp8"].append(name)
        if layout == "hf":
            heads = rotary_heads(name, args)
            transform = fix
            if heads:

                def transform(w, fix=fix, heads=heads):
                    return interleaved_to_halves(fix(w) if fix else w, heads)

            planned.append(_Planned(to_hf_name(name), record, out_dtype, transform, scale))
        else:
            planned.append(_Planned(name, record, out_dtype, fix, scale))

    if layout == "hf":
        planned = _stack_experts(planned, args)
    out_args = args
    if drop_vision:
        out_args = out_args.text_only()
    if dequantize:
        out_args = dataclasses.replace(out_args, quantization=None, quantization_config=None)
    removed = tuple(
        key
        for key, gone in (
            ("quantization", dequantize),
            ("quantization_config", dequantize),
            ("vision_encoder", drop_vision),
            ("multimodal", drop_vision),
        )
        if gone and getattr(args, key) is not None
    )
    contents: dict = {"text_tensors": text}
    if groups["carried"]:
        contents["carried"] = {"tensors": groups["carried"], "why": WHY_CARRIED}
    if groups["unused"]:
        contents["unused"] = {"tensors": groups["unused"], "why": WHY_UNUSED}
    if groups["fp8"]:
        contents["fp8_kept"] = {
            "tensors": groups["fp8"],
            "why": "--dtype keep: FP8 weights and their scales copied byte for byte; every "
            "FP8 byte checked (none is NaN), every scale finite",
        }
    if groups["dequantized"]:
        contents["dequantized"] = {
            "tensors": groups["dequantized"],
            "from": FP8,
            "to": target or "BF16",
            "how": HOW_DEQUANTIZED,
        }
    contents["left_out"] = [{"tensors": names, "why": why} for why, names in left_out.items()]
    contents["params"] = _params_account(checkpoint, layout, removed)
    return _Plan(planned, out_args, removed, contents)


def _stack_experts(planned: list[_Planned], args: ModelArgs) -> list[_Planned | _Stacked]:
    """The expert tensors replaced by HF Mistral4's stacked ones, each where its first part
    was (`checkpoint.hf_mistral4.stacked_experts`)."""
    stacked = stacked_experts(args)
    by_source = {p.record.name: p for p in planned}
    first_part = {parts[0]: (name, shape, parts) for name, (shape, parts) in stacked.items()}
    in_stack = {part for _, parts in stacked.values() for part in parts}
    out: list[_Planned | _Stacked] = []
    for p in planned:
        if p.record.name in first_part:
            name, shape, parts = first_part[p.record.name]
            planned_parts = tuple(by_source[n] for n in parts)
            dtypes = sorted({part.out_dtype for part in planned_parts})
            if len(dtypes) > 1:  # one tensor has one dtype: name what would break it
                raise CheckpointError(
                    p.record.path, f"{name}: its parts would be written as {', '.join(dtypes)}"
                )
            out.append(_Stacked(name, shape, planned_parts))
        elif p.record.name not in in_stack:
            out.append(p)
    return out


def _params_account(checkpoint: Source, layout: str, removed: tuple[str, ...]) -> dict:
    if layout == "hf":
        gone = {k: why for k, why in NOT_EXPORTED.items() if getattr(checkpoint.args, k)}
        return {"written": "config.json from params.json", "not_exported": gone}
    if checkpoint.layout == "hf":
        return {"written": "params.json from config.json"}
    if removed:
        return {
            "written": "params.json of the source without " + ", ".join(removed),
            "removed_keys": list(removed),
        }
    return {"written": "params.json of the source, copied as is"}


def _torch_dtype(planned: list[_Planned | _Stacked]) -> str:
    dtypes = {p.out_dtype for p in planned}
    return {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}.get(
        dtypes.pop() if len(dtypes) == 1 else "", "float32"
    )


def _write_folder(
    checkpoint: Source,
    plan: _Plan,
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
    checkpoint: Source, plan: _Plan, fds: dict[Path, int]
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
    checkpoint: Source, plan: _Plan, config: dict | None, tokenizer: Path, folder: Path
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
    planned: list[_Planned | _Stacked],
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
    writer: HashingWriter, p: _Planned, fd: int, scales: dict[str, fp8.WeightScale]
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
    writer: HashingWriter, fd: int, planned: _Planned, scale: fp8.WeightScale
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
