"""Placing the model on a `jax.sharding.Mesh` (docs/mesh.md).

Mesh axes are ("data", "expert", "model"). Where each weight goes is declared on the model's
fields (`model_jax.structure`): the routed experts' stacking axis over "expert" (whole experts
per device); tensor parallel over "model" — wq/wk/wv by output rows (heads), wo by input
columns, every FFN (inside each expert too) over hidden_dim, the head over the vocabulary and
the embedding table over dim; norms and routers are replicated, and an axis the mesh does not
divide stays replicated. "data" splits the batch of `model_jax.generate`. XLA's SPMD
partitioner inserts the collectives.

Each device's block is read straight from the memory-mapped safetensors shards
(`jax.make_array_from_callback` asks for one slice per device), so the host never holds more
than one slice at a time, never the whole model.
"""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from model_jax.structure import LeafSpec

AXES = ("data", "expert", "model")


def make_mesh(spec: str) -> Mesh:
    """'1x8' → a (data=1, expert=1, model=8) mesh over the first 8 devices; '1x4x2' → (data=1,
    expert=4, model=2)."""
    try:
        sizes = [int(n) for n in spec.lower().split("x")]
    except ValueError:
        sizes = []
    if len(sizes) not in (2, 3):
        raise ValueError(
            f"mesh must look like DATAxMODEL or DATAxEXPERTxMODEL, e.g. 1x8 or 1x4x2; got {spec!r}"
        )
    shape = (sizes[0], 1, sizes[1]) if len(sizes) == 2 else tuple(sizes)
    count, devices = int(np.prod(shape)), jax.devices()
    if min(shape) < 1 or count > len(devices):
        raise ValueError(f"mesh {spec} needs {count} devices, {len(devices)} available")
    return Mesh(np.array(devices[:count]).reshape(shape), AXES)


def sharded_array(
    spec: LeafSpec, shape: tuple[int, ...], dtype, mesh: Mesh, read_slice
) -> jax.Array:
    """A global array placed as `spec` declares, each device's block from `read_slice`."""
    sharding = NamedSharding(mesh, spec.partition_spec(shape, dict(mesh.shape)))
    return jax.make_array_from_callback(
        shape, sharding, lambda index: np.asarray(read_slice(index), dtype=dtype)
    )
