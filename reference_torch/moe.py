"""Mixtral's sparse feed-forward — mistral-inference `moe.py` (`MoeLayer`): route each token
to the top-k experts by gate logit, weight them by a softmax over those k logits (fp32, cast
back), and sum the weighted expert outputs in expert order. Two pieces: `router`, `experts`."""

import torch
import torch.nn.functional as F
from torch import nn

from checkpoint.args import ModelArgs
from checkpoint.pieces import Piece
from reference_torch.precision import at_least_fp32


class MoeLayer(nn.Module):
    def __init__(self, args: ModelArgs, expert_factory):  # Mixtral
        super().__init__()
        self.k = args.moe.num_experts_per_tok
        self.gate = nn.Linear(args.dim, args.moe.num_experts, bias=False)
        self.experts = nn.ModuleList(expert_factory(args) for _ in range(args.moe.num_experts))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each token's top-k experts (…, k) and their weights (…, k), best first; and the gate
        logits they were chosen from (…, experts)."""
        logits = self.gate(x)
        weights, selected = torch.topk(logits, self.k)
        return F.softmax(at_least_fp32(weights), dim=-1).to(x.dtype), selected, logits

    def mix(self, x: torch.Tensor, weights: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
        """The weighted sum of each token's chosen experts, accumulated in expert order."""
        tokens = x.reshape(-1, x.shape[-1])  # (B·T, dim)
        weights, selected = weights.reshape(len(tokens), -1), selected.reshape(len(tokens), -1)
        out = torch.zeros_like(tokens)
        for i, expert in enumerate(self.experts):
            rows, nth = torch.where(selected == i)
            out[rows] += weights[rows, nth, None] * expert(tokens[rows])
        return out.view_as(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, selected, _ = self.route(x)
        return self.mix(x, weights, selected)

    def pieces(self, x: str, out: str) -> tuple[Piece, ...]:
        return (
            Piece("router", self.route, (x,), ("expert_weights", "experts", "experts_scores")),
            Piece("experts", self.mix, (x, "expert_weights", "experts"), (out,)),
        )


class FineGrainedMoe:
    """Mistral Small 4 / Large 3's MoE (HF `Mistral4MoE` with vLLM's fp32 router): a softmax
    over all routed experts in fp32, the top `num_expert_groups_per_tok` groups by the sum of
    their two best scores, the top k experts in them, renormalised and × routed_scale; the
    routed experts' weighted sum in expert order, plus the shared experts on every token.

    Its modules sit at the block's top level in the checkpoint (`gate`, `shared_experts`,
    `experts.E`), so the block owns them; this object only runs them."""

    def __init__(self, args: ModelArgs, gate: nn.Linear, experts: nn.ModuleList, shared):
        moe = args.moe
        self.k, self.routed_scale = moe.num_experts_per_tok, moe.routed_scale
        self.groups, self.groups_per_tok = moe.num_expert_groups, moe.num_expert_groups_per_tok
        self.gate, self.experts, self.shared_experts = gate, experts, shared

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each token's k experts (…, k), their weights (…, k) and the scores they were
        chosen from (…, experts), in fp32."""
        scores = F.softmax(F.linear(at_least_fp32(x), at_least_fp32(self.gate.weight)), dim=-1)
        if self.groups > 1:
            grouped = scores.unflatten(-1, (self.groups, -1))
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)
            chosen = group_scores.topk(self.groups_per_tok, dim=-1).indices
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter(-1, chosen, True)
            scores_for_choice = (grouped * keep[..., None]).flatten(-2)
        else:
            scores_for_choice = scores
        selected = scores_for_choice.topk(self.k, dim=-1).indices
        weights = scores.gather(-1, selected)
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20) * self.routed_scale
        return weights, selected, scores

    def mix(self, x: torch.Tensor, weights: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
        """The routed experts' weighted sum, accumulated in expert order in x's dtype."""
        tokens = x.reshape(-1, x.shape[-1])
        weights = weights.reshape(len(tokens), -1).to(x.dtype)
        selected = selected.reshape(len(tokens), -1)
        out = torch.zeros_like(tokens)
        for i, expert in enumerate(self.experts):
            rows, nth = torch.where(selected == i)
            out[rows] += weights[rows, nth, None] * expert(tokens[rows])
        return out.view_as(x)

    def shared(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared_experts(x) if self.shared_experts is not None else torch.zeros_like(x)

    def pieces(self, x: str, out: str) -> tuple[Piece, ...]:
        return (
            Piece("router", self.route, (x,), ("expert_weights", "experts", "experts_scores")),
            Piece("experts", self.mix, (x, "expert_weights", "experts"), ("routed",)),
            Piece("shared_experts", self.shared, (x,), ("shared",)),
            Piece("moe_sum", torch.add, ("routed", "shared"), (out,), judged=False),
        )
