"""Read and validate a safetensors header without trusting it.

Format (safetensors spec): 8-byte little-endian header length N, N bytes of JSON mapping each
tensor name to `{"dtype", "shape", "data_offsets": [begin, end]}` (relative to the byte after the
header) plus an optional `__metadata__` str→str map, then the data.

The `safetensors` library validates every file too (it refuses gaps and trailing bytes, among
the rest); this module's own checks give precise messages and what the library cannot give:
each tensor's absolute byte offset, for memory-mapped bf16 reads. tests/test_fuzz.py checks
that both accept the same files.
"""

import itertools
import json
import math
import struct
from pathlib import Path

from safetensors import SafetensorError, safe_open

from checkpoint.errors import CheckpointError, describe, reading
from checkpoint.tensors import NUMPY_DTYPES, TensorRecord

MAX_HEADER_BYTES = 100_000_000


def read_safetensors_table(path: str | Path) -> dict[str, TensorRecord]:
    """Tensor name → where its bytes lie; CheckpointError on any malformed header."""
    path = Path(path)
    with reading(path):
        with open(path, "rb") as f:
            prefix = f.read(8)
            file_size = path.stat().st_size
            if len(prefix) < 8:
                raise CheckpointError(path, "file too short for a safetensors header")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(MAX_HEADER_BYTES, file_size - 8):
                raise CheckpointError(
                    path, f"header length {header_len} runs past the end of the file"
                )
            raw = f.read(header_len)
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(path, f"header is not valid JSON ({err})") from None
        if not isinstance(header, dict):
            raise CheckpointError(path, "header is not a JSON object")
        metadata = header.pop("__metadata__", {})
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise CheckpointError(path, "__metadata__ is not a map of strings")
        data_start = 8 + header_len
        records = _records(path, header, data_start, file_size - data_start)
        try:  # what our checks did not catch (gaps, trailing bytes, …)
            with safe_open(path, framework="numpy"):
                pass
        except SafetensorError as err:
            raise CheckpointError(path, f"not a valid safetensors file ({describe(err)})") from None
        return records


def _records(path: Path, header: dict, data_start: int, data_size: int) -> dict[str, TensorRecord]:
    records, spans = {}, []
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            shape = tuple(shape)
            if not all(_count(d) for d in shape) or len(shape) > 16:
                raise TypeError
            if not (_count(begin) and _count(end) and isinstance(dtype, str)):
                raise TypeError
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(path, f"malformed header entry for {name}") from None
        if dtype not in NUMPY_DTYPES:
            raise CheckpointError(path, f"tensor {name} has unsupported dtype {dtype}")
        nbytes = math.prod(shape) * NUMPY_DTYPES[dtype].itemsize
        if not 0 <= begin <= end <= data_size:
            raise CheckpointError(
                path,
                f"tensor {name} offsets [{begin}, {end}] are outside the data ({data_size} bytes)",
            )
        if end - begin != nbytes:
            raise CheckpointError(
                path, f"tensor {name} spans {end - begin} bytes, dtype and shape need {nbytes}"
            )
        spans.append((begin, end, name))
        records[name] = TensorRecord(name, path, dtype, shape, data_start + begin)
    spans.sort()
    for (_, end_a, name_a), (begin_b, _, name_b) in itertools.pairwise(spans):
        if begin_b < end_a:
            raise CheckpointError(path, f"tensors {name_a} and {name_b} overlap")
    return records


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
