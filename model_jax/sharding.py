"""Tensor-parallel placement of the model over a `jax.sharding.Mesh` (DESIGN.md §6).

Mesh axes are ("data", "model"). Weights are split over "model": attention by output rows of
wq/wk/wv (heads) and input columns of wo, the FFN over hidden_dim (rows of w1/w3, columns of
w2), Mixtral's experts over their expert axis, the output head over the vocabulary and the
embedding table over dim; norms and the router are replicated. XLA's SPMD partitioner inserts
the collectives. A dimension the model axis does not divide is left replicated.

Each device's block is read straight from the memory-mapped safetensors shards
(`jax.make_array_from_callback` asks for one slice per device), so the host never holds more
than one slice at a time, never the whole model.
"""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXES = ("data", "model")

# Which axis of each weight (torch (out, in) layout) is split over "model", by name suffix.
_MODEL_AXIS = {
    "wq.weight": 0,
    "wk.weight": 0,
    "wv.weight": 0,
    "wo.weight": 1,
    "w1.weight": 0,
    "w3.weight": 0,
    "w2.weight": 1,
    "tok_embeddings.weight": 1,
    "output.weight": 0,
}


def make_mesh(spec: str) -> Mesh:
    """'1x8' → a (data=1, model=8) mesh over the first 8 devices."""
    try:
        data, model = (int(n) for n in spec.lower().split("x"))
    except ValueError:
        raise ValueError(f"mesh must look like DATAxMODEL, e.g. 1x8; got {spec!r}") from None
    devices = jax.devices()
    if data * model > len(devices) or data < 1 or model < 1:
        raise ValueError(f"mesh {spec} needs {data * model} devices, {len(devices)} available")
    return Mesh(np.array(devices[: data * model]).reshape(data, model), AXES)


def partition_spec(name: str, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """Placement of a parameter requested by checkpoint name (see `model_jax.loading`);
    `shape` is its full shape, stacking axes (layers, experts) first."""
    size = mesh.shape["model"]
    spec: list[str | None] = [None] * len(shape)
    kind = ".".join(name.split(".")[-2:])
    if "{e}" in name and shape[-3] % size == 0:  # Mixtral: whole experts per device
        spec[-3] = "model"
    elif kind in _MODEL_AXIS and shape[len(shape) - 2 + _MODEL_AXIS[kind]] % size == 0:
        spec[len(shape) - 2 + _MODEL_AXIS[kind]] = "model"
    return PartitionSpec(*spec)


def sharded_array(name: str, shape: tuple[int, ...], dtype, mesh: Mesh, read_slice) -> jax.Array:
    """Build a global array whose every device block comes from `read_slice(index)`."""
    sharding = NamedSharding(mesh, partition_spec(name, shape, mesh))
    return jax.make_array_from_callback(
        shape, sharding, lambda index: np.asarray(read_slice(index), dtype=dtype)
    )
