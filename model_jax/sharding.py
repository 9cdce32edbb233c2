"""Placing the model on a `jax.sharding.Mesh` (docs/mesh.md).

Mesh axes are ("data", "model"). Where each weight goes is declared on the model's fields
(`model_jax.structure`): tensor parallel over "model" — wq/wk/wv by output rows (heads), wo by
input columns, the FFN over hidden_dim, Mixtral's experts whole per device, the head over the
vocabulary and the embedding table over dim; norms and the router are replicated, and an axis
the mesh does not divide stays replicated. "data" splits the batch of `model_jax.generate`.
XLA's SPMD partitioner inserts the collectives.

Each device's block is read straight from the memory-mapped safetensors shards
(`jax.make_array_from_callback` asks for one slice per device), so the host never holds more
than one slice at a time, never the whole model.
"""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from model_jax.structure import LeafSpec

AXES = ("data", "model")


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


def sharded_array(
    spec: LeafSpec, shape: tuple[int, ...], dtype, mesh: Mesh, read_slice
) -> jax.Array:
    """A global array placed as `spec` declares, each device's block from `read_slice`."""
    sharding = NamedSharding(mesh, spec.partition_spec(shape, dict(mesh.shape)))
    return jax.make_array_from_callback(
        shape, sharding, lambda index: np.asarray(read_slice(index), dtype=dtype)
    )
