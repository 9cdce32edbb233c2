"""Load an official or converted folder into the Equinox model, tensor by tensor.

The model's skeleton (`Transformer.zeros` under `eqx.filter_eval_shape`: shapes, no memory) is
walked once (`model_jax.structure.leaf_specs`): each leaf knows its checkpoint names (stacked
over layers, and experts) and its placement. Bytes are read through `checkpoint`'s restricted
readers (no pickle code runs, no torch needed) as memory maps, stacked, cast and placed before
the next leaf is read. With a mesh, every device's slice is read on its own
(`model_jax.sharding`).
"""

import dataclasses
import functools
import math
import re
from collections.abc import Callable
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from checkpoint.args import ModelArgs
from checkpoint.dtypes import jax_dtype
from checkpoint.errors import CheckpointError
from checkpoint.folder import CheckpointFolder, open_folder
from checkpoint.spec import shell_modules, tensor_spec, vocab_table
from checkpoint.tensors import NUMPY_DTYPES, layer_records, prefetch
from model_jax.model import FeedForward, Linear, Transformer, TransformerBlock
from model_jax.sharding import sharded_array
from model_jax.structure import LeafSpec, leaf_specs


def skeleton(args: ModelArgs, dtype, fp8: dict[str, tuple[int, ...]] | None = None) -> Transformer:
    """The model with every parameter a `jax.ShapeDtypeStruct`: shapes only, no memory.
    `fp8`: the linear weights stored in FP8 (checkpoint name, `{layers}` for the layer
    number → the shape of each tensor's scales: (1,), (rows,), or block FP8's grid of
    blocks), each given its `qscale_weight` (block FP8: its `weight_scale`)."""
    shapes = eqx.filter_eval_shape(Transformer.zeros, args, jax_dtype(dtype))
    block = args.fp8_block
    for spec in leaf_specs(shapes):
        if spec.name in (fp8 or {}):
            shape = _leaf(shapes, spec.path).shape
            scales = (*shape[: len(spec.stacks)], *fp8[spec.name])

            def quantized_linear(s=shape, c=scales) -> Linear:
                weight, scale = jnp.zeros(s, jnp.float8_e4m3fn), jnp.ones(c, jnp.float32)
                if block is None:
                    return Linear(weight, scale)
                return Linear(weight, weight_scale=scale, block=block)

            quantized = eqx.filter_eval_shape(quantized_linear)
            shapes = eqx.tree_at(lambda m, p=spec.path[:-1]: _leaf(m, p), shapes, quantized)
    return shapes


def stack_layout(args: ModelArgs) -> dict[str, tuple[int, int]]:
    """Each stack of blocks of the model: its first layer and how many layers (the dense-first
    ones, then the rest)."""
    dense = args.dense_layers
    return {"dense_layers": (0, dense), "layers": (dense, args.n_layers - dense)}


def leaf_names(spec: LeafSpec, args: ModelArgs, layout: dict | None = None) -> np.ndarray:
    """The checkpoint names behind a leaf, shaped like its stacking axes. `layout`: each stack
    of blocks' first layer and length (`stack_layout`), and optionally "experts": the first
    routed expert and how many (default all)."""
    layout = layout or stack_layout(args)
    first, count = layout.get(spec.path[0].name, (0, 0))
    experts = layout.get("experts", (0, args.moe.num_experts if args.moe else 0))
    sizes = {"layers": count, "experts": experts[1]}
    return spec.names(sizes, {"layers": first, "experts": experts[0]})


def _leaf(tree, path):
    for key in path:
        tree = getattr(tree, key.name)
    return tree


def fp8_weights(checkpoint: CheckpointFolder) -> dict[str, tuple[int, ...]]:
    """The FP8 linear weights of a folder, by name with `{layers}` (`{experts}`) for the
    numbers, and the shape of each one's scales in the model ((1,) for one scale);
    CheckpointError where layers disagree (the blocks are stacked: every layer must store a
    linear alike)."""
    quantized = {w: s for s, w in checkpoint.roles.weight_scales.items()}
    by_template: dict[str, list[str]] = {}
    for name in tensor_spec(checkpoint.args):
        by_template.setdefault(_template(name), []).append(name)
    fp8 = {}
    for template, names in by_template.items():
        sizes = {_scale_shape(checkpoint, quantized.get(n)) for n in names}
        if len(sizes) > 1:
            raise CheckpointError(
                checkpoint.path,
                f"{template.replace('{', '').replace('}', '')}: stored in FP8 in some layers "
                "and not in others, or with scales of different shapes (the JAX model stacks "
                "its layers alike)",
            )
        if (shape := sizes.pop()) is not None:
            fp8[template] = shape
    return fp8


def _scale_shape(checkpoint: CheckpointFolder, scale: str | None) -> tuple[int, ...] | None:
    """A weight scale's shape in the model: block FP8's grid as stored, else one number per
    row or (1,) for a tensor's single scale (stored 0-d or [1]); None without a scale."""
    if scale is None:
        return None
    shape = tuple(checkpoint.tensors[scale].shape)
    return shape if checkpoint.args.fp8_block else (math.prod(shape),)


def _template(name: str) -> str:
    """`layers.3.attention.wq.weight` → `layers.{layers}.attention.wq.weight`."""
    return _TEMPLATE.sub(lambda m: f"{m[1]}.{{{m[1]}}}.", name)


_TEMPLATE = re.compile(r"(layers|experts)\.\d+\.")


class PortLoader:
    """The weights of a converted (or official) folder, for the JAX model, in pieces."""

    def __init__(self, folder: str | Path):
        self.checkpoint = open_folder(folder)
        self.args = self.checkpoint.args
        self.fp8 = fp8_weights(self.checkpoint)
        self.layout = stack_layout(self.args)
        # The last group read, kept where it holds its tensors as stored: asked for again in a
        # wider dtype (bf16, then fp32), it is cast on the device, not read again.
        self._kept: tuple[tuple, TransformerBlock] | None = None

    def skeleton(self, dtype, args: ModelArgs | None = None) -> Transformer:
        """This folder's model as shapes, FP8 where the folder stores FP8."""
        return skeleton(args or self.args, dtype, self.fp8)

    def model(self, *, dtype="bfloat16", mesh: Mesh | None = None) -> Transformer:
        """Every parameter in `dtype` (FP8 weights stay FP8); every tensor of the text
        decoder and every weight scale placed exactly once."""
        model, used = self._fill(self.skeleton(dtype), mesh, lambda spec: True, self.layout)
        roles = self.checkpoint.roles
        wanted = set(tensor_spec(self.args)) | set(roles.weight_scales)
        assert used == wanted, f"tensors not placed in the model: {sorted(wanted - used)}"
        return model

    def shell(
        self,
        part: str,
        *,
        dtype="bfloat16",
        mesh: Mesh | None = None,
        rows: list[int] | None = None,
    ) -> Transformer:
        """What `part` needs loaded ("embed": the embeddings; "head": the final norm and the
        head, `checkpoint.spec.shell_modules`); everything else shapes only (nothing
        allocated), for running the model one block at a time. `rows` (ascending): only these
        rows of its vocabulary table (`vocab_table`) are read, and the shell's table holds
        them in that order."""
        modules = shell_modules(self.args, part)
        wanted = lambda spec: spec.path[0].name in modules  # noqa: E731
        shapes, chosen = self.skeleton(dtype), {}
        if rows is not None:
            table = vocab_table(self.args, part)
            if f"{table}.weight" in self.fp8:
                raise ValueError(f"{table}: the rows of an FP8 table are not read alone")
            leaf = getattr(shapes, table).weight
            narrowed = jax.ShapeDtypeStruct((len(rows), *leaf.shape[1:]), leaf.dtype)
            shapes = eqx.tree_at(lambda m: getattr(m, table).weight, shapes, narrowed)
            chosen = {f"{table}.weight": np.asarray(rows)}
        model, _ = self._fill(shapes, mesh, wanted, self.layout, chosen)
        return model

    def group(
        self,
        g: int,
        *,
        dtype="bfloat16",
        mesh: Mesh | None = None,
        routed_experts: bool = True,
    ) -> TransformerBlock:
        """The blocks of scan step g (`ModelArgs.layer_groups`), stacked as the forward's scan
        slices them out of the whole model (`Transformer.group`); block k of them is
        `model_jax.model.group_block(group, k, window)`, as in the forward. Without
        `routed_experts`, fine-grained MoE blocks come without them (`experts` None), to be
        read a few at a time (`experts`)."""
        layers = self.args.layer_groups[g]
        stack, part = self._part(layers)
        shapes = self.skeleton(dtype, part)
        target = self._group_of(shapes, stack, routed_experts)
        key = (g, mesh, routed_experts)
        if self._kept is not None and self._kept[0] == key:
            widened = _widened(self._kept[1], target)
            if widened is not None:
                return widened
        self._kept = None  # the previous group freed before this one is read
        self._prefetch(g, routed_experts)
        layout = {stack: (layers[0], len(layers))}
        wanted = self._wanted(stack, None if routed_experts else False)
        model, _ = self._fill(shapes, mesh, wanted, layout)
        blocks = self._group_of(model, stack, routed_experts)
        if self._read_exactly(shapes, wanted, layout):
            self._kept = (key, blocks)
        return blocks

    def _prefetch(self, g: int, routed_experts: bool) -> None:
        """Group g's bytes and the next group's asked of the disk now (`prefetch`): read in
        the background while g runs, found in the page cache when the next is read."""
        groups = self.args.layer_groups[g : g + 2]
        layers = [i for group in groups for i in group]
        prefetch(layer_records(self.checkpoint.tensors, layers, routed_experts))

    @staticmethod
    def _group_of(model, stack: str, routed_experts: bool):
        blocks = getattr(model, stack)
        if not routed_experts and blocks.experts is not None:  # left as shapes: dropped
            blocks = eqx.tree_at(lambda b: b.experts, blocks, None, is_leaf=lambda x: x is None)
        return blocks

    def _read_exactly(self, shapes, wanted: Callable[[LeafSpec], bool], layout: dict) -> bool:
        """Every wanted leaf of `shapes` holds its tensors as stored (no cast on reading)."""
        records = self.checkpoint.tensors
        return all(
            NUMPY_DTYPES[records[name].dtype] == leaf.dtype
            for spec, leaf in zip(leaf_specs(shapes), jax.tree.leaves(shapes), strict=True)
            if wanted(spec)
            for name in leaf_names(spec, self.args, layout).flat
        )

    def experts(
        self, layer: int, first: int, count: int, *, dtype="bfloat16", mesh: Mesh | None = None
    ) -> FeedForward:
        """Routed experts first … first + count − 1 of (fine-grained MoE) layer `layer`,
        stacked over experts as a block holds them all."""
        stack, part = self._part((layer,))
        shapes = self.skeleton(dtype, part)
        narrowed = jax.tree.map(
            lambda s: jax.ShapeDtypeStruct((s.shape[0], count, *s.shape[2:]), s.dtype),
            getattr(shapes, stack).experts,
        )
        shapes = eqx.tree_at(lambda m: getattr(m, stack).experts, shapes, narrowed)
        layout = {stack: (layer, 1), "experts": (first, count)}
        model, _ = self._fill(shapes, mesh, self._wanted(stack, experts=True), layout)
        return jax.tree.map(lambda a: a[0], getattr(model, stack).experts)

    def _part(self, layers: tuple[int, ...] | list[int]) -> tuple[str, ModelArgs]:
        """The stack these consecutive layers lie in, and the config of a model of them only."""
        dense = layers[0] < self.args.dense_layers
        part = dataclasses.replace(self.args, n_layers=len(layers))
        if part.moe is not None:  # a part of dense layers, or of routed ones
            routed_from = len(layers) if dense else 0
            part = dataclasses.replace(
                part, moe=dataclasses.replace(part.moe, first_k_dense_replace=routed_from)
            )
        return ("dense_layers" if dense else "layers"), part

    @staticmethod
    def _wanted(stack: str, experts: bool | None = None) -> Callable[[LeafSpec], bool]:
        """The leaves of `stack`: all (None), its routed experts' only (True), or the others."""

        def wanted(spec: LeafSpec) -> bool:
            if spec.path[0].name != stack:
                return False
            return experts is None or (spec.path[1].name == "experts") == experts

        return wanted

    def _fill(
        self,
        shapes,
        mesh,
        wanted: Callable[[LeafSpec], bool],
        layout: dict,
        rows: dict[str, np.ndarray] | None = None,
    ):
        """`shapes` with its wanted leaves read from the checkpoint; the names used. `layout`:
        each stack of blocks' first layer and length; `rows`: tensors read in these rows
        only."""
        leaves, treedef = jax.tree_util.tree_flatten(shapes)
        filled, used = [], set()
        for spec, leaf in zip(leaf_specs(shapes), leaves, strict=True):
            if not wanted(spec):
                filled.append(leaf)
                continue
            names = leaf_names(spec, self.args, layout)
            used.update(names.flat)
            filled.append(self._read(names, spec, leaf, mesh, rows or {}))
        return jax.tree_util.tree_unflatten(treedef, filled), used

    def _read(
        self, names: np.ndarray, spec: LeafSpec, leaf, mesh: Mesh | None, rows: dict
    ) -> jax.Array:
        records = self.checkpoint.tensors
        tail = leaf.shape[names.ndim :]  # each tensor's own shape in the model

        def part(name: str, rest: tuple[slice, ...]) -> np.ndarray:
            """Part `rest` of a tensor (of its shape in the model) from its file mapping; of
            one read in chosen rows, only the chosen rows the part covers."""
            if name not in rows:  # a per-tensor scale stored 0-d or [1]: the model holds [1]
                return records[name].array().reshape(tail)[rest]
            chosen = rows[name][rest[0]]
            if len(chosen) and chosen[-1] - chosen[0] == len(chosen) - 1:  # consecutive
                chosen = slice(int(chosen[0]), int(chosen[-1]) + 1)  # a view, not a copy
            return records[name].array()[chosen][(slice(None), *rest[1:])]

        def read_slice(index: tuple[slice, ...]) -> np.ndarray:
            index = tuple(index) + (slice(None),) * (len(leaf.shape) - len(index))
            lead, rest = index[: names.ndim], index[names.ndim :]
            chosen = names[lead] if names.ndim else names
            block = [part(n, rest) for n in np.ravel(chosen)]
            # Copied out of the file's mapping and cast in one pass, on the host (a cast on
            # the device would compile one program per tensor shape), into memory XLA's CPU
            # backend takes as the device buffer as it is (`host_array`).
            stacked = host_array((len(block), *block[0].shape), leaf.dtype)
            np.stack(block, out=stacked, casting="unsafe")
            return stacked.reshape(*np.shape(chosen), *block[0].shape)

        if mesh is not None:
            return sharded_array(spec, leaf.shape, leaf.dtype, mesh, read_slice)
        return jax.device_put(read_slice(()))


def host_array(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialised host array starting on a 64-byte boundary: placed on a CPU device,
    XLA then uses its memory as the buffer instead of copying it into fresh pages (numpy's
    own arrays are 16-byte aligned: copied)."""
    dtype = np.dtype(dtype)
    size = math.prod(shape) * dtype.itemsize
    raw = np.empty(size + _HOST_ALIGN, np.uint8)
    start = -raw.ctypes.data % _HOST_ALIGN
    return raw[start : start + size].view(dtype).reshape(shape)


_HOST_ALIGN = 64


def _widened(kept, target):
    """`kept`'s arrays in `target`'s dtypes (shapes alike), each cast on the device; None
    unless every cast widens (exact)."""
    arrays, treedef = jax.tree_util.tree_flatten(kept)
    dtypes = [leaf.dtype for leaf in jax.tree.leaves(target)]
    if len(dtypes) != len(arrays) or not all(
        _widens(a.dtype, d) for a, d in zip(arrays, dtypes, strict=True)
    ):
        return None
    changed = [k for k, (a, d) in enumerate(zip(arrays, dtypes, strict=True)) if a.dtype != d]
    cast = _cast([arrays[k] for k in changed], tuple(dtypes[k] for k in changed))
    for k, array in zip(changed, cast, strict=True):
        arrays[k] = array
    return jax.tree_util.tree_unflatten(treedef, arrays)


def _widens(source: np.dtype, target: np.dtype) -> bool:
    """Every value of `source` is exactly one of `target` (the same dtype, or bf16 → fp32)."""
    try:
        return np.promote_types(source, target) == target
    except TypeError:  # no common type (FP8 against a float)
        return False


@functools.partial(jax.jit, static_argnums=1)
def _cast(arrays: list[jax.Array], dtypes: tuple) -> list[jax.Array]:
    return [a.astype(d) for a, d in zip(arrays, dtypes, strict=True)]


def load_model(folder: str | Path, *, dtype="bfloat16", mesh: Mesh | None = None) -> Transformer:
    """The model of `folder` with every parameter in `dtype` ("bfloat16", "float32", … or a
    jnp dtype); strict on keys and shapes. With `mesh` (`model_jax.sharding.make_mesh`),
    weights are placed as their fields declare and no host ever holds more than one slice of
    one parameter."""
    return PortLoader(folder).model(dtype=dtype, mesh=mesh)
