"""Load an official or converted folder into the Equinox model, tensor by tensor.

Bytes are read through `checkpoint`'s restricted readers (no pickle code runs, no torch needed)
as memory maps. The model asks for parameters by checkpoint name, where `layers.` without a
block number means "stacked over all blocks" and `{e}` means "stacked over all experts"; each
such parameter is assembled on the host, cast and placed before the next one is read. With a
mesh, every device's slice is read on its own (see `model_jax.sharding`).
"""

from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jaxtyping import Array

from checkpoint.args import ModelArgs
from checkpoint.folder import open_folder
from checkpoint.spec import tensor_spec
from checkpoint.tensors import TensorRecord
from model_jax.model import Transformer, TransformerBlock
from model_jax.sharding import sharded_array


def stacked_names(name: str, args: ModelArgs) -> np.ndarray:
    """Checkpoint names behind a requested parameter, as an array shaped like its stacking
    axes: `layers.X` → (n_layers,), `...{e}...` → (..., num_experts)."""
    names = np.array(name, dtype=object)
    if name.startswith("layers.") and not name.split(".")[1].isdigit():
        names = np.array([f"layers.{i}.{name[7:]}" for i in range(args.n_layers)], dtype=object)
    if "{e}" in name:
        experts = range(args.moe.num_experts)
        names = np.vectorize(
            lambda n: np.array([n.format(e=e) for e in experts], dtype=object),
            otypes=[object],
            signature="()->(n)",
        )(names)
    return names


def make_getter(
    records: dict[str, TensorRecord],
    args: ModelArgs,
    dtype,
    mesh: Mesh | None = None,
    used: set[str] | None = None,
):
    """name → array (stacked as `stacked_names` says), placed on the default device or, with
    a mesh, sharded with each device reading only its slice."""

    def get(name: str) -> Array:
        names = stacked_names(name, args)
        inner = records[names.flat[0]].shape
        shape = (*names.shape, *inner)
        if used is not None:
            used.update(names.flat)

        def read_slice(index: tuple[slice, ...]) -> np.ndarray:
            index = tuple(index) + (slice(None),) * (len(shape) - len(index))
            lead, rest = index[: names.ndim], index[names.ndim :]
            chosen = names[lead] if names.ndim else names
            block = [records[n].array()[rest] for n in np.ravel(chosen)]
            return np.stack(block).reshape(*np.shape(chosen), *block[0].shape)

        if mesh is not None:
            return sharded_array(name, shape, jnp.dtype(dtype), mesh, read_slice)
        # Cast on the host: a device-side cast would compile one program per tensor shape.
        return jax.device_put(np.asarray(read_slice(()), dtype=jnp.dtype(dtype)))

    return get


class PortLoader:
    """The weights of a converted (or official) folder, for the JAX model, in pieces."""

    def __init__(self, folder: str | Path):
        self.checkpoint = open_folder(folder)
        self.args = self.checkpoint.args

    def _getter(self, dtype, mesh: Mesh | None, used: set[str] | None = None):
        return make_getter(self.checkpoint.tensors, self.args, dtype, mesh, used)

    def model(self, *, dtype=jnp.bfloat16, mesh: Mesh | None = None) -> Transformer:
        """Every parameter in `dtype`; strict on keys and shapes."""
        used: set[str] = set()
        model = Transformer.load(self.args, self._getter(dtype, mesh, used))
        unused = sorted(set(self.checkpoint.tensors) - used)
        assert not unused, f"checkpoint tensors not placed in the model: {unused}"
        return model

    def shell(self, *, dtype=jnp.bfloat16, mesh: Mesh | None = None) -> Transformer:
        """Embeddings, final norm and head loaded; the blocks are shapes only (nothing
        allocated), for running the model one block at a time."""
        get = self._getter(dtype, mesh)
        return eqx.tree_at(
            lambda m: (m.tok_embeddings.weight, m.norm.weight, m.output.weight),
            skeleton(self.args, dtype),
            (get("tok_embeddings.weight"), get("norm.weight"), get("output.weight")),
        )

    def block(self, i: int, *, dtype=jnp.bfloat16, mesh: Mesh | None = None) -> TransformerBlock:
        """Block `i` alone."""
        return TransformerBlock.load(
            self.args, self._getter(dtype, mesh), f"layers.{i}.", self.args.layer_windows[i]
        )


def skeleton(args: ModelArgs, dtype) -> Transformer:
    """The model with every parameter a `jax.ShapeDtypeStruct`: shapes only, no memory."""
    spec = tensor_spec(args)

    def zeros(name: str) -> Array:
        names = stacked_names(name, args)
        return jnp.zeros((*names.shape, *spec[names.flat[0]]), dtype)

    return eqx.filter_eval_shape(Transformer.load, args, zeros)


def load_model(folder: str | Path, *, dtype=jnp.bfloat16, mesh: Mesh | None = None) -> Transformer:
    """The model of `folder` with every parameter in `dtype`; strict on keys and shapes.

    With `mesh` (axes ("data", "model"), `model_jax.sharding.make_mesh`), weights are sharded
    tensor-parallel over "model" and no host ever holds more than one slice of one parameter.
    """
    return PortLoader(folder).model(dtype=dtype, mesh=mesh)
