"""Load an official or converted folder into the Equinox model, tensor by tensor.

Bytes are read through `checkpoint`'s restricted readers (no pickle code runs, no torch needed)
as memory maps; each parameter is stacked over layers on the host, cast and moved to the device
before the next one is read, so peak host memory is about one stacked parameter.
"""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from checkpoint.folder import open_folder
from model_jax.model import Transformer


def load_model(folder: str | Path, *, dtype=jnp.bfloat16) -> Transformer:
    """The model of `folder` with every parameter in `dtype`; strict on keys and shapes."""
    checkpoint = open_folder(folder)
    args, records = checkpoint.args, checkpoint.tensors
    used: set[str] = set()

    def get(name: str) -> Array:
        if name.startswith("layers."):
            names = [f"layers.{i}.{name[len('layers.') :]}" for i in range(args.n_layers)]
            host = np.stack([records[n].array() for n in names])
        else:
            names = [name]
            host = records[name].array()
        used.update(names)
        return jax.device_put(jnp.asarray(host, dtype=dtype))

    model = Transformer.load(args, get)
    unused = sorted(set(records) - used)
    assert not unused, f"checkpoint tensors not placed in the model: {unused}"
    return model
