"""One of two processes joined by `jax.distributed` (CPU, gloo collectives, 4 host devices
each): loads the converted folder onto one 1x8 mesh spanning both and writes, as JSON, the
gathered logits and what this process read."""

import json
import sys

import jax

process_id, port, folder, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)

import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

import model_jax  # noqa: E402
from model_jax import sharding  # noqa: E402
from model_jax.sharding import make_mesh  # noqa: E402

read_bytes = []
make_array = jax.make_array_from_callback


def counting(shape, placement, callback):
    def wrapped(index):
        block = callback(index)
        read_bytes.append(block.nbytes)
        return block

    return make_array(shape, placement, wrapped)


sharding.jax.make_array_from_callback = counting
model = model_jax.load_model(folder, dtype="float32", mesh=make_mesh("1x8"))
tokens = np.array([1, 415, 5565, 302, 9, 77, 1024], np.int32)
logits = multihost_utils.process_allgather(model(tokens), tiled=True)
leaves = jax.tree_util.tree_leaves(model)
wq = model.layers.attention.wq.weight
result = {
    "global_devices": len(jax.devices()),
    "local_devices": len(jax.local_devices()),
    "logits": np.asarray(logits).tolist(),
    "read_bytes": sum(read_bytes),
    # Distinct blocks held here (a replicated leaf is read once for all local devices).
    "local_block_bytes": sum(
        sum({str(s.index): s.data.nbytes for s in x.addressable_shards}.values()) for x in leaves
    ),
    "model_bytes": sum(x.nbytes for x in leaves),
    "wq_local_fraction": sum(s.data.size for s in wq.addressable_shards) / wq.size,
}
with open(out, "w") as file:
    json.dump(result, file)
