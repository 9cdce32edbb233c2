"""Build a safetensors header (safetensors spec: u64 length, JSON, padded to 8 bytes)."""

import json
import struct
from collections.abc import Iterable


def header_bytes(
    tensors: Iterable[tuple[str, str, tuple[int, ...], int]], metadata: dict[str, str]
) -> bytes:
    """Length prefix + JSON header for (name, dtype, shape, nbytes) laid out back to back."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape, nbytes in tensors:
        header[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw
