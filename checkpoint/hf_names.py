"""The HF transformers names of a Mistral/Mixtral checkpoint's tensors, and the rotary
permutation of wq/wk.

Official weights rotate interleaved pairs (x[2i], x[2i+1]); HF's `rotate_half` rotates halves
(x[i], x[i + head_dim/2]). Permuting the output rows of wq and wk per head maps one onto the
other (HF `convert_mistral_weights_to_hf.py` uses the same `view(h, hd/2, 2, dim)` transpose).
Latent attention with fine-grained experts: `checkpoint.hf_mistral4` (no permutation, experts
stacked).
"""

import re

import numpy as np

from checkpoint import hf_mistral4
from checkpoint.args import ModelArgs

_LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.gate.weight": "block_sparse_moe.gate.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
} | hf_mistral4.LAYER_NAMES
_TOP_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_EXPERT = re.compile(r"feed_forward\.experts\.(\d+)\.(w[123])\.weight")


def to_hf_name(name: str) -> str:
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    layer, rest = re.fullmatch(r"layers\.(\d+)\.(.+)", name).groups()
    if expert := _EXPERT.fullmatch(rest):
        return f"model.layers.{layer}.block_sparse_moe.experts.{expert[1]}.{expert[2]}.weight"
    if expert := hf_mistral4.EXPERT.fullmatch(rest):  # a part of a stacked tensor
        return f"model.layers.{layer}.{hf_mistral4.STACKED[expert[2]]}"
    return f"model.layers.{layer}.{_LAYER_NAMES[rest]}"


def from_hf_names(names) -> dict[str, str]:
    """HF name → official name for every name; ValueError naming an unknown one."""
    inverse = {}
    for official_name in _official_candidates(names):
        inverse[to_hf_name(official_name)] = official_name
    unknown = sorted(set(names) - set(inverse))
    if unknown:
        raise ValueError(f"unknown HF tensor name {unknown[0]}")
    return {n: inverse[n] for n in names}


def _official_candidates(names):
    layers = {int(m[1]) for n in names if (m := re.match(r"model\.layers\.(\d+)\.", n))}
    experts = {int(m[1]) for n in names if (m := re.search(r"\.experts\.(\d+)\.", n))}
    yield from _TOP_NAMES
    for i in layers:
        for rest in _LAYER_NAMES:
            yield f"layers.{i}.{rest}"
        for e in experts:
            for w in ("w1", "w2", "w3"):
                yield f"layers.{i}.feed_forward.experts.{e}.{w}.weight"


def rotary_heads(name: str, args: ModelArgs) -> int | None:
    """How many heads a tensor's rows hold if it needs the rotary permutation, else None."""
    if name.endswith("attention.wq.weight"):
        return args.n_heads
    if name.endswith("attention.wk.weight"):
        return args.n_kv_heads
    return None


def interleaved_to_halves(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Official (interleaved pairs) → HF (rotate_half) row order of wq/wk."""
    out_dim, dim = w.shape
    return (
        w.reshape(n_heads, out_dim // n_heads // 2, 2, dim)
        .transpose(0, 2, 1, 3)
        .reshape(out_dim, dim)
    )


def halves_to_interleaved(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF (rotate_half) → official (interleaved pairs) row order; inverse of the above."""
    out_dim, dim = w.shape
    return (
        w.reshape(n_heads, 2, out_dim // n_heads // 2, dim)
        .transpose(0, 2, 1, 3)
        .reshape(out_dim, dim)
    )
