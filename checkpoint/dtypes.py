"""One dtype vocabulary for every API: the names "bfloat16", "float16", "float32".

Functions taking a dtype accept one of these names, or a JAX / numpy / torch dtype of the same
name, and convert it here; nothing else keeps its own dtype table.
"""

import ml_dtypes
import numpy as np
import torch

DTYPE_NAMES = ("bfloat16", "float16", "float32")


def dtype_name(dtype) -> str:
    """The vocabulary name of `dtype`; ValueError for anything else."""
    name = str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype) else None
    if name is None:
        try:
            name = np.dtype(dtype).name
        except TypeError:
            name = str(dtype)
    if name not in DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {dtype!r}")
    return name


def jax_dtype(dtype) -> np.dtype:
    """The numpy dtype JAX uses for it (bfloat16 from ml_dtypes)."""
    name = dtype_name(dtype)
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def torch_dtype(dtype) -> torch.dtype:
    return getattr(torch, dtype_name(dtype))
