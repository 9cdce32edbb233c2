"""Faults injected into a checkpoint's weights, to prove verify localises them."""

import torch

from checkpoint.args import ModelArgs


def hf_rotary_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The interleaved → rotate_half layout change HF applies to wq/wk (DESIGN.md §2)."""
    out_dim, dim = w.shape
    head_dim = out_dim // n_heads
    return w.view(n_heads, head_dim // 2, 2, dim).transpose(1, 2).reshape(out_dim, dim)


def scale_w2(state, args: ModelArgs, block: int) -> None:
    state[f"layers.{block}.feed_forward.w2.weight"] *= 1.02


def swap_wk_wv(state, args: ModelArgs, block: int) -> None:
    prefix = f"layers.{block}.attention."
    state[prefix + "wk.weight"], state[prefix + "wv.weight"] = (
        state[prefix + "wv.weight"],
        state[prefix + "wk.weight"],
    )


def permute_rotary(state, args: ModelArgs, block: int) -> None:
    prefix = f"layers.{block}.attention."
    state[prefix + "wq.weight"] = hf_rotary_permute(state[prefix + "wq.weight"], args.n_heads)
    state[prefix + "wk.weight"] = hf_rotary_permute(state[prefix + "wk.weight"], args.n_kv_heads)


def perturb_norm(state, args: ModelArgs, block: int) -> None:
    weight = state[f"layers.{block}.ffn_norm.weight"]
    noise = torch.randn(weight.shape, generator=torch.Generator().manual_seed(block))
    state[f"layers.{block}.ffn_norm.weight"] = (weight.float() * (1 + 0.02 * noise)).to(
        weight.dtype
    )


FAULTS = {
    "w2-scaled-2pct": scale_w2,
    "wk-wv-swapped": swap_wk_wv,
    "rotary-permuted": permute_rotary,
    "norm-perturbed-2pct": perturb_norm,
}
