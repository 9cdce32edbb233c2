"""Mixtral's sparse feed-forward in Equinox — mirrors `reference_torch/moe.py`.

Experts are stored stacked (leading `experts` axis) and evaluated together with `vmap`, so the
program does not grow with the number of layers; each token's output is the softmax-weighted
sum of its top-k experts, accumulated in expert order in the model dtype as the reference does.
All experts are computed for every token (dense): simple and exact, at num_experts / k times
the FLOPs of a gathered implementation.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Int


def route(
    gate_logits: Float[Array, "seq experts"], k: int
) -> tuple[Float[Array, "seq k"], Int[Array, "seq k"]]:
    """Top-k experts per token (ties: lower index first) and their softmax weights (fp32 softmax
    over the k chosen logits, cast to the logits' dtype)."""
    top, selected = lax.top_k(gate_logits, k)
    return jax.nn.softmax(top.astype(jnp.float32), axis=-1).astype(gate_logits.dtype), selected


class MoeFeedForward(eqx.Module):
    gate: eqx.Module  # Linear: dim → experts
    experts: eqx.Module  # FeedForward, every leaf stacked over a leading `experts` axis
    num_experts_per_tok: int = eqx.field(static=True)

    def __call__(self, x: Float[Array, "seq dim"]) -> Float[Array, "seq dim"]:
        weights, selected = route(self.gate(x), self.num_experts_per_tok)
        params, static = eqx.partition(self.experts, eqx.is_array)
        outputs = jax.vmap(lambda p: eqx.combine(p, static)(x))(params)  # (experts, seq, dim)
        out = jnp.zeros_like(x)
        for e in range(outputs.shape[0]):
            coef = jnp.sum(jnp.where(selected == e, weights, jnp.zeros_like(weights)), axis=-1)
            out = out + coef[:, None] * outputs[e]
        return out
