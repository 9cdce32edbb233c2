"""Faults verify must catch, each confined to one block.

Weight faults edit a checkpoint's tensors (the converted folder then carries them). Code faults
are bf16-only numerics bugs that fp32 cannot see, injected as a subclass of one JAX block's
module: the realistic ways a port loses precision.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import torch
from jax import lax

from checkpoint.args import ModelArgs
from model_jax import model as jax_model
from model_jax.rope import apply_rotary


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


def nan_in_w2(state, args: ModelArgs, block: int) -> None:
    state[f"layers.{block}.feed_forward.w2.weight"][5, 7] = float("nan")


def inf_in_wv(state, args: ModelArgs, block: int) -> None:
    state[f"layers.{block}.attention.wv.weight"][3, 9] = float("inf")


WEIGHT_FAULTS = {
    "w2-scaled-2pct": scale_w2,
    "wk-wv-swapped": swap_wk_wv,
    "rotary-permuted": permute_rotary,
    "norm-perturbed-2pct": perturb_norm,
    "nan-weight": nan_in_w2,
    "inf-weight": inf_in_wv,
}


class RMSNormInBf16(jax_model.RMSNorm):
    """No fp32 upcast: mean of squares and rsqrt in the input dtype."""

    def __call__(self, x):
        eps = jnp.asarray(self.eps, x.dtype)
        return x * lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * self.weight


class RMSNormRoundedScale(jax_model.RMSNorm):
    """A rounding moved: the inverse RMS is rounded to bf16 before the multiply (a coherent
    per-token scale error), instead of rounding the product."""

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        inverse = lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return x * inverse.astype(x.dtype) * self.weight


class AttentionVariant(jax_model.Attention):
    """The port's attention with one numerics change (`variant`)."""

    variant: str = eqx.field(static=True, default="")

    def __call__(self, x, cos, sin, positions, cached=None):
        T, rep = x.shape[0], self.n_heads // self.n_kv_heads
        if self.variant == "rope-angles-bf16":  # position × frequency in bf16
            exponents = jnp.arange(0, self.head_dim, 2, dtype=jnp.float32) / self.head_dim
            freqs = (1.0 / (10000.0**exponents)).astype(jnp.bfloat16)
            angles = positions.astype(jnp.bfloat16)[:, None] * freqs[None, :]
            cos, sin = jnp.cos(angles).astype(jnp.float32), jnp.sin(angles).astype(jnp.float32)
        xq = apply_rotary(self.wq(x).reshape(T, self.n_heads, self.head_dim), cos, sin)
        xk = apply_rotary(self.wk(x).reshape(T, self.n_kv_heads, self.head_dim), cos, sin)
        xv = self.wv(x).reshape(T, self.n_kv_heads, self.head_dim)
        q = xq.reshape(T, self.n_kv_heads, rep, self.head_dim)
        scores = jnp.einsum("tgrd,sgd->grts", q, xk, precision=jax_model.HIGHEST)
        scores = (scores.astype(jnp.float32) * self.head_dim**-0.5).astype(x.dtype)
        visible = jax_model.attention_mask(positions, positions, self.sliding_window)
        if self.variant == "softmax-bf16":  # exp and its normaliser summed in bf16
            scores = jnp.where(visible, scores, -jnp.inf)
            e = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
            total = lax.reduce(e, jnp.asarray(0, e.dtype), lax.add, (e.ndim - 1,))
            probs = e / total[..., None]
        else:
            scores = jnp.where(visible, scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
            probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
        out = jnp.einsum("grts,sgd->tgrd", probs, xv, precision=jax_model.HIGHEST)
        return self.wo(out.reshape(T, -1)), xk, xv


def _norms(block, cls):
    return eqx.tree_at(
        lambda b: (b.attention_norm, b.ffn_norm),
        block,
        (
            cls(block.attention_norm.weight, block.attention_norm.eps),
            cls(block.ffn_norm.weight, block.ffn_norm.eps),
        ),
    )


def _attention(block, variant: str):
    a = block.attention
    replaced = AttentionVariant(
        a.wq, a.wk, a.wv, a.wo, a.n_heads, a.n_kv_heads, a.head_dim, a.sliding_window, variant
    )
    return eqx.tree_at(lambda b: b.attention, block, replaced)


CODE_FAULTS = {
    "rmsnorm-in-bf16": lambda block: _norms(block, RMSNormInBf16),
    "inverse-rms-rounded": lambda block: _norms(block, RMSNormRoundedScale),
    "softmax-bf16": lambda block: _attention(block, "softmax-bf16"),
    "rope-angles-bf16": lambda block: _attention(block, "rope-angles-bf16"),
}
