"""Mixtral's sparse feed-forward in Equinox — mirrors `reference_torch/moe.py`.

Experts are stored stacked (a leading `experts` axis, split over the mesh's model axis: whole
experts per device) and all evaluated with `vmap` on every token (dense: simple and exact, at
num_experts / k times the FLOPs of a gathered implementation); each token's output is the
softmax-weighted sum of its top-k experts, accumulated in expert order in the model dtype as the
reference does.
"""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Int

from checkpoint.args import ModelArgs
from checkpoint.pieces import Piece
from model_jax.structure import sharded, stacked


def route(
    gate_logits: Float[Array, "seq experts"], k: int
) -> tuple[Float[Array, "seq k"], Int[Array, "seq k"]]:
    """Top-k experts per token (ties: lower index first) and their softmax weights (fp32 softmax
    over the k chosen logits, cast to the logits' dtype)."""
    top, selected = lax.top_k(gate_logits, k)
    return jax.nn.softmax(top.astype(jnp.float32), axis=-1).astype(gate_logits.dtype), selected


class MoeFeedForward(eqx.Module):
    gate: eqx.Module = sharded(None, None)  # Linear: dim → experts (the router, replicated)
    experts: eqx.Module = stacked("experts", "model")  # FeedForward, stacked over experts
    num_experts_per_tok: int = eqx.field(static=True)

    def route(
        self, x: Float[Array, "seq dim"]
    ) -> tuple[Float[Array, "seq k"], Int[Array, "seq k"]]:
        """Each token's top-k experts and their weights, best first."""
        return route(self.gate(x), self.num_experts_per_tok)

    def mix(
        self,
        x: Float[Array, "seq dim"],
        weights: Float[Array, "seq k"],
        selected: Int[Array, "seq k"],
    ) -> Float[Array, "seq dim"]:
        """The weighted sum of each token's chosen experts, accumulated in expert order."""
        params, static = eqx.partition(self.experts, eqx.is_array)
        outputs = jax.vmap(lambda p: eqx.combine(p, static)(x))(params)  # (experts, seq, dim)
        out = jnp.zeros_like(x)
        for e in range(outputs.shape[0]):
            coef = jnp.sum(jnp.where(selected == e, weights, jnp.zeros_like(weights)), axis=-1)
            out = out + coef[:, None] * outputs[e]
        return out

    def __call__(self, x: Float[Array, "seq dim"]) -> Float[Array, "seq dim"]:
        return self.mix(x, *self.route(x))

    def pieces(self, x: str, out: str) -> tuple[Piece, ...]:
        """As `reference_torch.moe.MoeLayer.pieces`."""
        return (
            Piece("router", self.route, (x,), ("expert_weights", "experts")),
            Piece("experts", self.mix, (x, "expert_weights", "experts"), (out,)),
        )

    @classmethod
    def zeros(
        cls, args: ModelArgs, dtype, make_expert: Callable, make_gate: Callable
    ) -> "MoeFeedForward":
        """`make_expert(args, dtype)` builds one expert (as the reference's `expert_factory`),
        `make_gate(out, in, dtype)` the router."""
        experts = eqx.filter_vmap(lambda _: make_expert(args, dtype))(
            jnp.arange(args.moe.num_experts)
        )
        gate = make_gate(args.moe.num_experts, args.dim, dtype)
        return cls(gate, experts, args.moe.num_experts_per_tok)
