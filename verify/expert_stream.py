"""Streaming within a layer, on the port's side: a fine-grained MoE block held without its
routed experts (`PortLoader.group(..., routed_experts=False)`), run with the experts read a
few at a time (one Mistral Large 3 layer holds ≈ 11 GB of FP8 experts).

The block runs its own declared pieces (`checkpoint.pieces`), compiled: those before the
`experts` piece, then the block's own `mix` over each part of the experts that some token
chose (each part read, added to the last part's sum, dropped: `model_jax.moe.sparse_mix`, the
same terms in the same order as one call over all of them), then the pieces after it. Parts
no real token chose are not read (padding rows may choose them: their outputs are dropped).
"""

import equinox as eqx
import jax.numpy as jnp
import numpy as np

from checkpoint.pieces import run_pieces
from model_jax.loading import PortLoader

EXPERTS = "experts"  # the piece that mixes the routed experts
EXPERTS_PER_READ = 4  # at most; fp32, one Large-3 expert dequantized is 352 MB


class ExpertStream:
    """Runs block pieces of layers whose routed experts are read on demand."""

    def __init__(self, loader: PortLoader, mesh=None):
        self.loader, self.mesh = loader, mesh
        experts = loader.args.moe.num_experts if loader.args.moe else 1
        self.per_read = max(d for d in range(1, EXPERTS_PER_READ + 1) if experts % d == 0)

    def run(self, block, layer: int, values: dict, n: int) -> dict:
        """Every piece of `block` in order from `values` (its input and context), as its
        forward runs them; every value computed. `n`: the real (unpadded) tokens."""
        pieces = block.pieces()
        names = [p.name for p in pieces]
        at = names.index(EXPERTS)
        values = values | _run(block, tuple(names[:at]), values)
        values |= self._mix(block, layer, pieces[at], values, n)
        return values | _run(block, tuple(names[at + 1 :]), values)

    def each(self, block, layer: int, given: dict, names: tuple[str, ...], n: int) -> list:
        """Each of the pieces `names` on its inputs taken from `given` (teacher-forced), in
        declaration order: (name, outputs)."""
        others = _each(block, tuple(name for name in names if name != EXPERTS), given)
        out = dict(others)
        if EXPERTS in names:
            (piece,) = [p for p in block.pieces() if p.name == EXPERTS]
            out[EXPERTS] = self._mix(block, layer, piece, given, n)
        return [(name, out[name]) for name in names]

    def _mix(self, block, layer: int, piece, values: dict, n: int) -> dict:
        x, weights, selected = (values[name] for name in piece.inputs)
        chosen = np.unique(np.asarray(selected)[:n])
        out = jnp.zeros_like(x)
        for first in sorted({int(e) // self.per_read * self.per_read for e in chosen}):
            experts = self.loader.experts(
                layer, first, self.per_read, dtype=x.dtype, mesh=self.mesh
            )
            held = eqx.tree_at(lambda b: b.experts, block, experts, is_leaf=lambda v: v is None)
            out = _mix_part(held, x, weights, selected, jnp.int32(first), out)
            del experts, held
        (name,) = piece.outputs
        return {name: out}


@eqx.filter_jit
def _run(block, names: tuple[str, ...], values: dict) -> dict:
    """The pieces `names` of `block` in order from `values`: what they computed."""
    pieces = [p for p in block.pieces() if p.name in names]
    computed = run_pieces(pieces, values)
    return {o: computed[o] for p in pieces for o in p.outputs}


@eqx.filter_jit
def _each(block, names: tuple[str, ...], given: dict) -> list:
    return [(p.name, p(given)) for p in block.pieces() if p.name in names]


@eqx.filter_jit
def _mix_part(block, x, weights, selected, first, out):
    return block.mix(x, weights, selected, first, out)
