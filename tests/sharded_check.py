"""Run in a child process with 8 fake CPU devices (XLA_FLAGS is read when JAX starts):
compares a mesh-sharded model with the single-device one and prints the findings as JSON."""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

import model_jax
from model_jax import sharding
from model_jax.generate import _batch_placement
from model_jax.sharding import make_mesh
from verify import vocab
from verify.run import run_verification

folder, mesh_spec, reference = sys.argv[1], sys.argv[2], sys.argv[3]
reads = []  # (bytes one callback returned, bytes of the whole parameter, devices it is split over)
make_array = jax.make_array_from_callback


def recording(shape, placement, callback):
    def wrapped(index):
        block = callback(index)
        parts = int(np.prod([placement.mesh.shape[a] for a in placement.spec if a]))
        reads.append((block.nbytes, int(np.prod(shape)) * block.itemsize, parts))
        return block

    return make_array(shape, placement, wrapped)


sharding.jax.make_array_from_callback = recording
mesh = make_mesh(mesh_spec)
single = model_jax.load_model(folder, dtype=jnp.float32)
sharded = model_jax.load_model(folder, dtype=jnp.float32, mesh=mesh)
tokens = jnp.asarray(np.random.default_rng(0).integers(3, 500, 40), jnp.int32)
expected, actual = np.asarray(single(tokens)), np.asarray(sharded(tokens))
wq = sharded.layers.attention.wq.weight
prompts = [tokens[:7].tolist(), tokens.tolist()]
# Streamed, the head read 4096 rows at a time: each slice split over "model" by vocabulary rows,
# each device reading its own rows of it (counted in `reads` with the rest).
vocab.HEAD_BYTES = 8 * single.args.dim * 4096
streamed_in_parts = run_verification(
    reference, folder, prompts=["In slices"], max_new_tokens=4, mesh=mesh, stream_layers=True
).verdict
# Data parallel: a 2x4 mesh splits the batch over "data", the weights over "model".
data_parallel = model_jax.load_model(folder, dtype=jnp.float32, mesh=make_mesh("2x4"))
batch_sharding = _batch_placement(data_parallel, 2)(jnp.zeros((2, 3))).sharding
print(
    json.dumps(
        {
            "devices": len(jax.devices()),
            "logits_rel_error": float(np.abs(actual - expected).max() / np.abs(expected).max()),
            "wq_shard_fractions": sorted({s.data.size / wq.size for s in wq.addressable_shards}),
            "wq_devices": len({s.device for s in wq.addressable_shards}),
            "reads_exact_slices": all(got * parts == whole for got, whole, parts in reads),
            "largest_read": max(got for got, _, _ in reads),
            "largest_slice": max(whole // parts for _, whole, parts in reads),
            "model_bytes": sum(x.nbytes for x in jax.tree_util.tree_leaves(single)),
            "generate_equal": model_jax.generate(sharded, prompts, max_new_tokens=8)
            == model_jax.generate(single, prompts, max_new_tokens=8),
            "data_parallel_generate_equal": model_jax.generate(
                data_parallel, prompts, max_new_tokens=8
            )
            == model_jax.generate(single, prompts, max_new_tokens=8),
            "batch_split_over": list(batch_sharding.spec),
            "verify": run_verification(
                reference,
                folder,
                prompts=["Sharded, and still the same"],
                max_new_tokens=8,
                mesh=mesh,
            ).verdict,
            "verify_streamed_head_in_parts": streamed_in_parts,
        }
    )
)
