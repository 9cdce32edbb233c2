"""The parameter structure of the model, declared once on the module fields.

Each field holding parameters says how its arrays lie on a device mesh (`sharded`: a mesh axis
or None per array axis), and a field whose leaves carry a leading stacking axis says so
(`stacked`: "layers" or "experts", itself split over a mesh axis or not). From these
declarations and the field names — which are the checkpoint's names — `leaf_specs` derives, for
every leaf of a model (or a skeleton of one), its checkpoint name and its placement, in one walk:
loading, sharding and the tests all read the same table (MaxText's logical axis rules, equinox's
skeletons).
"""

import dataclasses

import equinox as eqx
import jax
import numpy as np
from jax.sharding import PartitionSpec


def sharded(*axes: str | None, **kwargs):
    """A parameter field whose array axes lie on these mesh axes (None: replicated)."""
    return eqx.field(metadata={"sharded": axes}, **kwargs)


def stacked(axis: str, mesh_axis: str | None = None, checkpoint: str | None = None, **kwargs):
    """A field whose every leaf has a leading `axis` (layers, experts) split over `mesh_axis`;
    `checkpoint`: the name its leaves have in the checkpoint, if not the field's."""
    metadata = {"stacked": (axis, mesh_axis)} | ({"checkpoint": checkpoint} if checkpoint else {})
    return eqx.field(metadata=metadata, **kwargs)


@dataclasses.dataclass(frozen=True)
class LeafSpec:
    """One parameter array: where it lives in the model, what the checkpoint calls it, and how
    it lies on a mesh."""

    path: tuple  # jax key path from the model's root
    name: str  # checkpoint name, with {layers} / {experts} where stacked
    stacks: tuple[str, ...]  # stacking axes, outermost first
    axes: tuple[str | None, ...]  # declared mesh axis or None per array axis (stacks first)

    def names(self, sizes: dict[str, int], first: dict[str, int] | None = None) -> np.ndarray:
        """The checkpoint names behind this leaf, shaped like its stacking axes; `first`: the
        index each stacking axis starts at (a group of layers further down the model)."""
        shape = tuple(sizes[s] for s in self.stacks)
        first = first or {}
        names = np.empty(shape, dtype=object)
        for index in np.ndindex(shape):
            numbers = {s: first.get(s, 0) + n for s, n in zip(self.stacks, index, strict=True)}
            names[index] = self.name.format(**numbers)
        return names

    def partition_spec(self, shape: tuple[int, ...], mesh_shape: dict[str, int]) -> PartitionSpec:
        """The declared placement: each mesh axis splits the outermost array axis declared on
        it that it divides; the other axes (and those on an axis the mesh lacks) are
        replicated."""
        used, spec = set(), []
        for axis, size in zip(self.axes, shape, strict=True):
            split = axis in mesh_shape and axis not in used and size % mesh_shape[axis] == 0
            spec.append(axis if split else None)
            used |= {axis} if split else set()
        return PartitionSpec(*spec)


def leaf_specs(model) -> list[LeafSpec]:
    """Every leaf of `model` (a module or a skeleton of ShapeDtypeStructs), in flattening
    order; ValueError naming a leaf no field declares a placement for."""
    leaves = jax.tree_util.tree_flatten_with_path(model)[0]
    return [_spec(model, path) for path, _ in leaves]


def _spec(model, path) -> LeafSpec:
    name, stacks, stack_axes, axes = [], [], [], None
    owner = model
    for key in path:
        field = {f.name: f for f in dataclasses.fields(owner)}[key.name]
        name.append(field.metadata.get("checkpoint", key.name))
        if "stacked" in field.metadata:
            axis, mesh_axis = field.metadata["stacked"]
            stacks.append(axis)
            stack_axes.append(mesh_axis)
            name.append(f"{{{axis}}}")
        if "sharded" in field.metadata:
            axes = field.metadata["sharded"]
        if "rows_of" in field.metadata and axes is not None:  # one value per row (or one)
            axes = axes[:1]
        if "blocks_of" in field.metadata and axes is not None:  # block scales: replicated
            axes = (None,) * len(axes)
        owner = getattr(owner, key.name)
    if axes is None:
        raise ValueError(f"no placement declared for {'.'.join(name)}")
    return LeafSpec(tuple(path), ".".join(name), tuple(stacks), (*stack_axes, *axes))
