"""Mixtral's sparse feed-forward in Equinox — mirrors `reference_torch/moe.py`.

Experts are stored stacked (a leading `experts` axis, split over the mesh's expert axis: whole
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
from checkpoint.sections import MoeArgs
from model_jax.layers import HIGHEST
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
    experts: eqx.Module = stacked("experts", "expert")  # FeedForward, stacked over experts
    num_experts_per_tok: int = eqx.field(static=True)

    def route(
        self, x: Float[Array, "seq dim"]
    ) -> tuple[Float[Array, "seq k"], Int[Array, "seq k"], Float[Array, "seq experts"]]:
        """Each token's top-k experts and their weights, best first; and the gate logits they
        were chosen from."""
        logits = self.gate(x)
        return *route(logits, self.num_experts_per_tok), logits

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
        weights, selected, _ = self.route(x)
        return self.mix(x, weights, selected)

    def pieces(self, x: str, out: str) -> tuple[Piece, ...]:
        """As `reference_torch.moe.MoeLayer.pieces`."""
        return (
            Piece("router", self.route, (x,), ("expert_weights", "experts", "experts_scores")),
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


def fine_grained_route(
    logits: Float[Array, "seq experts"], moe: MoeArgs
) -> tuple[Float[Array, "seq k"], Int[Array, "seq k"], Float[Array, "seq experts"]]:
    """As `reference_torch.moe.FineGrainedMoe.route`, from fp32 gate logits: a softmax over
    all experts, the best groups by the sum of their two best scores, the top k experts in them
    (ties: the lower index), their scores renormalised and × routed_scale (fp32)."""
    scores = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    choice = scores
    if moe.num_expert_groups > 1:
        grouped = scores.reshape(*scores.shape[:-1], moe.num_expert_groups, -1)
        group_scores = lax.top_k(grouped, 2)[0].sum(-1)
        chosen = lax.top_k(group_scores, moe.num_expert_groups_per_tok)[1]
        keep = jnp.any(chosen[..., None] == jnp.arange(moe.num_expert_groups), axis=-2)
        choice = jnp.where(keep[..., None], grouped, jnp.zeros_like(grouped)).reshape(scores.shape)
    selected = lax.top_k(choice, moe.num_experts_per_tok)[1]
    weights = jnp.take_along_axis(scores, selected, axis=-1)
    weights = weights / (weights.sum(-1, keepdims=True) + 1e-20) * moe.routed_scale
    return weights, selected, scores


def sparse_mix(
    experts: eqx.Module,
    x: Float[Array, "seq dim"],
    weights: Float[Array, "seq k"],
    selected: Int[Array, "seq k"],
    first: Int[Array, ""] | int = 0,
    out: Float[Array, "seq dim"] | None = None,
) -> Float[Array, "seq dim"]:
    """The chosen experts only (grouped matmuls over the token–expert pairs sorted by expert,
    `lax.ragged_dot`), each token's k outputs weighted and summed in expert order in x's
    dtype, as the reference accumulates them. `experts`: a FeedForward stacked over experts.
    Under `vmap` (a batch of sequences) the batch is folded into the tokens: one grouped
    matmul for all of them (`lax.ragged_dot` has no batching rule of its own). On a mesh
    whose expert axis splits `experts`, XLA partitions the grouped matmul by expert: each
    device multiplies by its own experts only (the group sizes gathered, the outputs summed
    over the expert axis), never gathering another device's weights.

    Streamed within a layer (`out` given): `experts` holds experts `first`, `first` + 1, …
    only, and their weighted outputs are added to `out` in the same order, the others'
    left out. Run over consecutive parts of the experts in order, each starting from the
    last one's sum, this adds the same terms in the same order as one call over all of
    them (a single sequence only)."""
    if out is None:
        return _sparse_mix(experts, x, weights, selected)
    return _sparse_tokens(experts, x, weights, selected, first, out)


@jax.custom_batching.custom_vmap
def _sparse_mix(experts, x, weights, selected):
    return _sparse_tokens(experts, x, weights, selected)


@_sparse_mix.def_vmap
def _sparse_mix_batched(axis_size, in_batched, experts, x, weights, selected):
    if any(jax.tree.leaves(in_batched[0])):
        raise NotImplementedError("experts batched over sequences")

    def fold(a, batched):  # (batch, seq, …) → (batch·seq, …)
        a = a if batched else jnp.broadcast_to(a, (axis_size, *a.shape))
        return a.reshape(-1, *a.shape[2:])

    tokens = [fold(a, b) for a, b in zip((x, weights, selected), in_batched[1:], strict=True)]
    out = _sparse_tokens(experts, *tokens)
    return out.reshape(axis_size, -1, out.shape[-1]), True


def _sparse_tokens(experts, x, weights, selected, first=0, out=None):
    T, k = selected.shape
    held = experts.w1.weight.shape[0]
    local = selected - first  # index among the experts held
    here = (local >= 0) & (local < held)
    flat = jnp.where(here, local, held).reshape(-1)  # pairs of other experts sort last
    order = jnp.argsort(flat, stable=True)  # token-expert pairs grouped by expert
    sizes = jnp.bincount(flat, length=held)  # the others in no group
    xs = x[order // k]

    def grouped(linear, h):
        weight = linear.dequantized(h.dtype)  # (experts, out, in)
        return lax.ragged_dot(h, weight.transpose(0, 2, 1), sizes, precision=HIGHEST)

    gate = jax.nn.silu(grouped(experts.w1, xs).astype(jnp.float32)).astype(x.dtype)
    ys = grouped(experts.w2, gate * grouped(experts.w3, xs))
    ys = jnp.zeros_like(ys).at[order].set(ys).reshape(T, k, -1)  # back to (token, slot)
    contributions = weights.astype(x.dtype)[..., None] * ys
    contributions = jnp.where(here[..., None], contributions, jnp.zeros_like(contributions))
    by_expert = jnp.argsort(selected, axis=-1, stable=True)
    contributions = jnp.take_along_axis(contributions, by_expert[..., None], axis=1)
    out = jnp.zeros_like(x) if out is None else out
    for j in range(k):  # sequential, in expert order, as the reference's per-expert loop
        out = out + contributions[:, j]
    return out
