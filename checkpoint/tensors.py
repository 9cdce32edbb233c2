"""Where a tensor's bytes lie in a file, and how to view them as a numpy array (no copy)."""

import dataclasses
import math
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
