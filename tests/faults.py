"""Faults verify must catch, each confined to one block.

Weight faults edit a checkpoint's tensors (the converted folder then carries them). Code faults
are bf16-only numerics bugs that fp32 cannot see, injected into the port's stacked blocks as
subclasses of its modules with one flag per layer, so the same faulty blocks run in the whole
model's scan and in verify's streamed groups: the realistic ways a port loses precision.
"""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import torch
from jax import lax
from jaxtyping import Array, Bool

from checkpoint.args import ModelArgs
from model_jax import model as jax_model
from model_jax.structure import sharded


def hf_rotary_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The interleaved → rotate_half change HF applies to wq/wk (docs/formats.md, HF interop)."""
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


class FaultyRMSNorm(jax_model.RMSNorm):
    """RMSNorm with a bf16 numerics bug where `faulty` (one flag per stacked layer)."""

    faulty: Bool[Array, "*stack"] = sharded()
    variant: str = eqx.field(static=True)

    def __call__(self, x):
        if self.variant == "rmsnorm-in-bf16":  # no fp32 upcast
            eps = jnp.asarray(self.eps, x.dtype)
            bad = x * lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * self.weight
        else:  # "inverse-rms-rounded": the inverse RMS rounded before the multiply
            xf = x.astype(jnp.float32)
            inverse = lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
            bad = x * inverse.astype(x.dtype) * self.weight
        return jnp.where(self.faulty, bad, super().__call__(x))


class FaultyAttention(jax_model.Attention):
    """Attention with a bf16 numerics bug where `faulty`."""

    faulty: Bool[Array, "*stack"] = sharded()
    variant: str = eqx.field(static=True)

    def project(self, x, rope, positions):
        right = super().project(x, rope, positions)
        if self.variant != "rope-angles-bf16":
            return right
        exponents = jnp.arange(0, self.head_dim, 2, dtype=jnp.float32) / self.head_dim
        freqs = (1.0 / (10000.0**exponents)).astype(jnp.bfloat16)
        angles = positions.astype(jnp.bfloat16)[:, None] * freqs[None, :]  # both in bf16
        wrong = super().project(
            x,
            (jnp.cos(angles).astype(jnp.float32), jnp.sin(angles).astype(jnp.float32)),
            positions,
        )
        return tuple(jnp.where(self.faulty, w, r) for w, r in zip(wrong, right, strict=True))

    def attend(self, xq, xk, xv, positions, cached=None):
        right = super().attend(xq, xk, xv, positions, cached)
        if self.variant != "softmax-bf16":
            return right
        T, rep = xq.shape[0], self.n_heads // self.n_kv_heads
        q = xq.reshape(T, self.n_kv_heads, rep, self.head_dim)
        scores = jnp.einsum("tgrd,sgd->grts", q, xk, precision=jax_model.HIGHEST)
        scores = (scores.astype(jnp.float32) * self.head_dim**-0.5).astype(xq.dtype)
        visible = jax_model.attention_mask(positions, positions, self.sliding_window)
        scores = jnp.where(visible, scores, -jnp.inf)  # exp and its normaliser summed in bf16
        e = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
        total = lax.reduce(e, jnp.asarray(0, e.dtype), lax.add, (e.ndim - 1,))
        probs = e / total[..., None]
        out = jnp.einsum("grts,sgd->tgrd", probs, xv, precision=jax_model.HIGHEST)
        return jnp.where(self.faulty, self.wo(out.reshape(T, -1)), right)


def _norms(blocks, faulty, variant):
    def faulty_norm(norm):
        return FaultyRMSNorm(norm.weight, norm.eps, faulty, variant)

    return eqx.tree_at(
        lambda b: (b.attention_norm, b.ffn_norm),
        blocks,
        (faulty_norm(blocks.attention_norm), faulty_norm(blocks.ffn_norm)),
    )


def _attention(blocks, faulty, variant):
    a = blocks.attention
    fields = {f.name: getattr(a, f.name) for f in dataclasses.fields(a)}
    return eqx.tree_at(
        lambda b: b.attention, blocks, FaultyAttention(**fields, faulty=faulty, variant=variant)
    )


CODE_FAULTS = {
    "rmsnorm-in-bf16": _norms,
    "inverse-rms-rounded": _norms,
    "softmax-bf16": _attention,
    "rope-angles-bf16": _attention,
}


def inject_code_fault(blocks, fault: str, faulty: np.ndarray):
    """Stacked blocks (leaves [layers, …]) with `fault` in the layers where `faulty` is set."""
    flags = jax.device_put(np.asarray(faulty, bool))
    return CODE_FAULTS[fault](blocks, flags, fault)
