"""Where a tensor's bytes lie in a file, and how to view them as a numpy array (no copy)."""

import dataclasses
import math
import os
from collections.abc import Iterable
from pathlib import Path

import ml_dtypes
import numpy as np

# safetensors dtype name → numpy dtype. The torch storage names map onto these.
NUMPY_DTYPES: dict[str, np.dtype] = {
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F16": np.dtype(np.float16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),  # FP8 weights (2025–26 releases)
}


@dataclasses.dataclass(frozen=True)
class TensorRecord:
    """A C-contiguous little-endian tensor stored at `offset` (absolute) in `path`."""

    name: str
    path: Path
    dtype: str  # safetensors dtype name, a key of NUMPY_DTYPES
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * NUMPY_DTYPES[self.dtype].itemsize

    def read(self) -> np.ndarray:
        """A fresh in-memory copy (plain reads: no mapping stays resident afterwards)."""
        count = self.nbytes // NUMPY_DTYPES[self.dtype].itemsize
        data = np.fromfile(self.path, NUMPY_DTYPES[self.dtype], count=count, offset=self.offset)
        return data.reshape(self.shape)

    def array(self) -> np.ndarray:
        """A read-only memory-mapped view of the tensor (pages are read as they are touched)."""
        dtype = NUMPY_DTYPES[self.dtype]
        if self.nbytes == 0:
            return np.zeros(self.shape, dtype)
        return np.memmap(self.path, dtype=dtype, mode="r", offset=self.offset, shape=self.shape)


def prefetch(records: Iterable[TensorRecord]) -> None:
    """Ask the kernel to read these tensors' bytes into the page cache in the background
    (`POSIX_FADV_WILLNEED`: large reads queued now, nothing waited for), so reading them later
    through a mapping finds them there instead of faulting each page in from the disk. A
    hint: no effect on any value; nothing done where the OS has no `posix_fadvise`."""
    if not hasattr(os, "posix_fadvise"):
        return
    by_file: dict[Path, list[TensorRecord]] = {}
    for record in records:
        by_file.setdefault(record.path, []).append(record)
    for path, in_file in by_file.items():
        with open(path, "rb") as file:
            for record in in_file:
                os.posix_fadvise(
                    file.fileno(), record.offset, record.nbytes, os.POSIX_FADV_WILLNEED
                )


def layer_records(
    tensors: dict[str, TensorRecord], layers: Iterable[int], routed_experts: bool = True
) -> list[TensorRecord]:
    """The records of these layers' tensors (without their fine-grained routed experts',
    `layers.{i}.experts.…`, unless `routed_experts`)."""
    layers = list(layers)
    prefixes = tuple(f"layers.{i}." for i in layers)
    experts = tuple(f"layers.{i}.experts." for i in layers)
    return [
        record
        for name, record in tensors.items()
        if name.startswith(prefixes) and (routed_experts or not name.startswith(experts))
    ]
