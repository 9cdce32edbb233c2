"""One dtype vocabulary for every API: the names "bfloat16", "float16", "float32".

Functions taking a dtype accept one of these names, or a JAX / numpy / torch dtype of the same
name, and convert it here; nothing else keeps its own dtype table.
"""

import ml_dtypes
import numpy as np

DTYPE_NAMES = ("bfloat16", "float16", "float32")
# float64: the torch reference only, as verify's truth for fp32 (the port never runs in it).
REFERENCE_ONLY = ("float64",)


def dtype_name(dtype) -> str:
    """The vocabulary name of `dtype`; ValueError for anything else."""
    text = str(dtype)
    name = text.removeprefix("torch.") if text.startswith("torch.") else None
    if name is None:
        try:
            name = np.dtype(dtype).name
        except TypeError:
            name = str(dtype)
    if name not in DTYPE_NAMES + REFERENCE_ONLY:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {dtype!r}")
    return name


def jax_dtype(dtype) -> np.dtype:
    """The numpy dtype JAX uses for it (bfloat16 from ml_dtypes)."""
    name = dtype_name(dtype)
    if name in REFERENCE_ONLY:
        raise ValueError(f"the JAX model does not run in {name}")
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def torch_dtype(dtype):
    """The torch dtype of that name (torch is imported here only: the JAX side never needs it)."""
    import torch

    return getattr(torch, dtype_name(dtype))
