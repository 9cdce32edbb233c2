"""Mixtral's sparse feed-forward — mistral-inference `moe.py` (`MoeLayer`): route each token
to the top-k experts by gate logit, weight them by a softmax over those k logits (fp32, cast
back), and sum the weighted expert outputs in expert order."""

import torch
import torch.nn.functional as F
from torch import nn

from checkpoint.args import ModelArgs


class MoeLayer(nn.Module):
    def __init__(self, args: ModelArgs, expert_factory):
        super().__init__()
        self.k = args.moe.num_experts_per_tok
        self.gate = nn.Linear(args.dim, args.moe.num_experts, bias=False)
        self.experts = nn.ModuleList(expert_factory(args) for _ in range(args.moe.num_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])  # (B·T, dim)
        weights, selected = torch.topk(self.gate(tokens), self.k)  # (B·T, k)
        weights = F.softmax(weights, dim=1, dtype=torch.float).to(x.dtype)
        out = torch.zeros_like(tokens)
        for i, expert in enumerate(self.experts):
            rows, nth = torch.where(selected == i)
            out[rows] += weights[rows, nth, None] * expert(tokens[rows])
        return out.view_as(x)
