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
    def __init__(self, args: ModelArgs, expert_factory):
        super().__init__()
        self.k = args.moe.num_experts_per_tok
        self.gate = nn.Linear(args.dim, args.moe.num_experts, bias=False)
        self.experts = nn.ModuleList(expert_factory(args) for _ in range(args.moe.num_experts))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's top-k experts (…, k) and their weights (…, k), best first."""
        weights, selected = torch.topk(self.gate(x), self.k)
        return F.softmax(at_least_fp32(weights), dim=-1).to(x.dtype), selected

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
        return self.mix(x, *self.route(x))

    def pieces(self, x: str, out: str) -> tuple[Piece, ...]:
        return (
            Piece("router", self.route, (x,), ("expert_weights", "experts")),
            Piece("experts", self.mix, (x, "expert_weights", "experts"), (out,)),
        )
