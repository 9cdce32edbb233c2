"""Run in a child process with 8 fake CPU devices (XLA_FLAGS is read when JAX starts): loads a
fine-grained MoE model on each mesh given, compares its logits with the single-device model's,
and counts, per device, the routed experts' bytes it holds and the bytes it asked the checkpoint
for; prints the findings as JSON."""

import collections
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

import model_jax
from model_jax import loading
from model_jax.sharding import make_mesh
from model_jax.structure import leaf_specs

folder, mesh_specs = sys.argv[1], sys.argv[2:]
reads = collections.Counter()  # device → bytes of routed experts its callbacks returned
place = loading.sharded_array


def counting(spec, shape, dtype, mesh, read_slice):
    """`sharded_array`, each routed-expert read counted for the device it was asked for."""
    placement = NamedSharding(mesh, spec.partition_spec(shape, dict(mesh.shape)))
    waiting = list(placement.addressable_devices_indices_map(shape).items())

    def counted(index):
        block = np.asarray(read_slice(index))
        device = next(d for d, i in waiting if i == index)
        waiting.remove((device, index))
        if "experts" in spec.stacks:
            reads[device.id] += block.nbytes
        return block

    return place(spec, shape, dtype, mesh, counted)


def routed_experts(model) -> list[jax.Array]:
    """The leaves stacked over routed experts."""
    leaves = jax.tree_util.tree_leaves(model)
    return [x for s, x in zip(leaf_specs(model), leaves, strict=True) if "experts" in s.stacks]


def held(arrays: list[jax.Array], mesh) -> dict:
    """Bytes each device holds of `arrays`, and whether each device's experts are those of its
    place on the mesh's expert axis (a contiguous share, in order)."""
    size = mesh.shape["expert"]
    coordinate = {d.id: c[1] for c, d in np.ndenumerate(mesh.devices)}
    bytes_by_device, own_experts = collections.Counter(), True
    for x in arrays:
        share = x.shape[1] // size
        for shard in x.addressable_shards:
            bytes_by_device[shard.device.id] += shard.data.nbytes
            first = coordinate[shard.device.id] * share
            own_experts &= shard.index[1].indices(x.shape[1])[:2] == (first, first + share)
    return {"held": dict(bytes_by_device), "own_experts": bool(own_experts)}


loading.sharded_array = counting
single = model_jax.load_model(folder, dtype=jnp.float32)
vocab = single.args.vocab_size
tokens = jnp.asarray(np.random.default_rng(0).integers(3, min(vocab, 5000), 48), jnp.int32)
expected = np.asarray(single(tokens))
found = {"routed_bytes": sum(x.nbytes for x in routed_experts(single)), "meshes": {}}
for spec in mesh_specs:
    reads.clear()
    mesh = make_mesh(spec)
    sharded = model_jax.load_model(folder, dtype=jnp.float32, mesh=mesh)
    actual = np.asarray(sharded(tokens))
    found["meshes"][spec] = {
        "shape": dict(mesh.shape),
        "logits_rel_error": float(np.abs(actual - expected).max() / np.abs(expected).max()),
        "read": dict(reads),
        **held(routed_experts(sharded), mesh),
    }
print(json.dumps(found))
