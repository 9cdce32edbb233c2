"""Load an official or converted folder into the Equinox model, tensor by tensor.

The model's skeleton (`Transformer.zeros` under `eqx.filter_eval_shape`: shapes, no memory) is
walked once (`model_jax.structure.leaf_specs`): each leaf knows its checkpoint names (stacked
over layers, and experts) and its placement. Bytes are read through `checkpoint`'s restricted
readers (no pickle code runs, no torch needed) as memory maps, stacked, cast and placed before
the next leaf is read. With a mesh, every device's slice is read on its own
(`model_jax.sharding`).
"""

import dataclasses
from collections.abc import Callable
from pathlib import Path

import equinox as eqx
import jax
import numpy as np
from jax.sharding import Mesh

from checkpoint.args import ModelArgs
from checkpoint.dtypes import jax_dtype
from checkpoint.folder import open_folder
from model_jax.model import Transformer, TransformerBlock
from model_jax.sharding import sharded_array
from model_jax.structure import LeafSpec, leaf_specs


def skeleton(args: ModelArgs, dtype) -> Transformer:
    """The model with every parameter a `jax.ShapeDtypeStruct`: shapes only, no memory."""
    return eqx.filter_eval_shape(Transformer.zeros, args, jax_dtype(dtype))


class PortLoader:
    """The weights of a converted (or official) folder, for the JAX model, in pieces."""

    def __init__(self, folder: str | Path):
        self.checkpoint = open_folder(folder)
        self.args = self.checkpoint.args
        self.sizes = {"layers": self.args.n_layers}
        if self.args.moe is not None:
            self.sizes["experts"] = self.args.moe.num_experts

    def model(self, *, dtype="bfloat16", mesh: Mesh | None = None) -> Transformer:
        """Every parameter in `dtype`; every tensor of the checkpoint placed exactly once."""
        model, used = self._fill(skeleton(self.args, dtype), mesh, lambda spec: True)
        unused = sorted(set(self.checkpoint.tensors) - used)
        assert not unused, f"checkpoint tensors not placed in the model: {unused}"
        return model

    def shell(self, *, dtype="bfloat16", mesh: Mesh | None = None) -> Transformer:
        """Embeddings, final norm and head loaded; the blocks are shapes only (nothing
        allocated), for running the model one block at a time."""
        model, _ = self._fill(skeleton(self.args, dtype), mesh, lambda s: "layers" not in s.stacks)
        return model

    def group(self, g: int, *, dtype="bfloat16", mesh: Mesh | None = None) -> TransformerBlock:
        """The blocks of scan step g (`ModelArgs.layer_groups`), stacked as the forward's scan
        slices them out of the whole model (`Transformer.group`); block k of them is
        `model_jax.model.group_block(group, k, window)`, as in the forward."""
        layers = self.args.layer_groups[g]
        part = skeleton(dataclasses.replace(self.args, n_layers=len(layers)), dtype)
        sizes = self.sizes | {"layers": len(layers)}
        wanted = lambda spec: "layers" in spec.stacks  # noqa: E731
        model, _ = self._fill(part, mesh, wanted, sizes, {"layers": layers[0]})
        return model.layers

    def _fill(self, shapes, mesh, wanted: Callable[[LeafSpec], bool], sizes=None, first=None):
        """`shapes` with its wanted leaves read from the checkpoint; the names used. `sizes`
        and `first`: the length and first index of each stacking axis (default: all)."""
        leaves, treedef = jax.tree_util.tree_flatten(shapes)
        filled, used = [], set()
        for spec, leaf in zip(leaf_specs(shapes), leaves, strict=True):
            if not wanted(spec):
                filled.append(leaf)
                continue
            names = spec.names(sizes or self.sizes, first)
            used.update(names.flat)
            filled.append(self._read(names, spec, leaf, mesh))
        return jax.tree_util.tree_unflatten(treedef, filled), used

    def _read(self, names: np.ndarray, spec: LeafSpec, leaf, mesh: Mesh | None) -> jax.Array:
        records = self.checkpoint.tensors

        def read_slice(index: tuple[slice, ...]) -> np.ndarray:
            index = tuple(index) + (slice(None),) * (len(leaf.shape) - len(index))
            lead, rest = index[: names.ndim], index[names.ndim :]
            chosen = names[lead] if names.ndim else names
            block = [records[n].array()[rest] for n in np.ravel(chosen)]
            return np.stack(block).reshape(*np.shape(chosen), *block[0].shape)

        if mesh is not None:
            return sharded_array(spec, leaf.shape, leaf.dtype, mesh, read_slice)
        # Cast on the host: a device-side cast would compile one program per tensor shape.
        return jax.device_put(np.asarray(read_slice(()), dtype=leaf.dtype))


def load_model(folder: str | Path, *, dtype="bfloat16", mesh: Mesh | None = None) -> Transformer:
    """The model of `folder` with every parameter in `dtype` ("bfloat16", "float32", … or a
    jnp dtype); strict on keys and shapes. With `mesh` (`model_jax.sharding.make_mesh`),
    weights are placed as their fields declare and no host ever holds more than one slice of
    one parameter."""
    return PortLoader(folder).model(dtype=dtype, mesh=mesh)
