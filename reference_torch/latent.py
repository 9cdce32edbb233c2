"""Multi-head latent attention (MLA) — Mistral Small 4 and Large 3; the semantics of HF
transformers `Mistral4Attention` and vLLM's DeepSeek-V2 MLA with mistral-format names
(docs/formats.md, "Latent attention").

Queries: wq_b(q_a_norm(wq_a x)), each head [nope | rope]. Keys and values from one latent per
token: wkv_a_with_mqa x = [kv (kv_lora_rank) | k_rope (one head shared by all)], kv normed by
kv_a_norm and expanded by wkv_b into each head's [k_nope | v]. RoPE on interleaved pairs of the
rope parts only; Llama-4 scaling on the whole query; scores × (nope + rope)^-0.5, × YaRN's
magnitude² when `apply_scale` (the DeepSeek convention, vLLM's reading; `softmax_factor`).
The cache holds the latent and the rope key, not the expanded heads.
"""

import torch
import torch.nn.functional as F
from torch import nn

from checkpoint.args import ModelArgs
from checkpoint.pieces import Piece
from reference_torch.norm import RMSNorm
from reference_torch.precision import at_least_fp32
from reference_torch.rope import apply_rotary_emb, llama_4_scaled


def softmax_factor(args: ModelArgs, hf_reading: bool = False) -> float:
    """What the scores' scale is multiplied by: YaRN's magnitude squared if `apply_scale`.
    With `apply_scale: false` (both MLA releases) 1, as vLLM and SGLang read it; HF
    transformers' `Mistral4` multiplies by the magnitude squared whenever `mscale_all_dim` is
    set, as its configs have it (`hf_reading`: that reading, which verify shows, never uses;
    docs/formats.md)."""
    yarn = args.yarn
    applied = yarn is not None and (yarn.apply_scale or hf_reading)
    return yarn.magnitude**2 if applied else 1.0


def softmax_scale(args: ModelArgs, hf_reading: bool = False) -> float:
    """The scores' scale: (nope + rope)^-0.5 × `softmax_factor`."""
    return args.head_dim**-0.5 * softmax_factor(args, hf_reading)


class LatentAttention(nn.Module):
    cached_values = ("kv_latent", "k_rope")  # what the cache holds per token

    def __init__(self, args: ModelArgs, window: int | None):
        super().__init__()
        assert window is None  # ModelArgs refuses windows with latent attention
        self.n_heads = args.n_heads
        self.nope, self.rope, self.v_dim = (
            args.qk_nope_head_dim,
            args.qk_rope_head_dim,
            args.v_head_dim,
        )
        self.kv_lora_rank = args.kv_lora_rank
        self.llama_4_scaling = args.llama_4_scaling
        self.scale = softmax_scale(args)
        h, d = args.n_heads, args.dim
        self.wq_a = nn.Linear(d, args.q_lora_rank, bias=False)
        self.q_a_norm = RMSNorm(args.q_lora_rank, args.norm_eps)
        self.wq_b = nn.Linear(args.q_lora_rank, h * args.head_dim, bias=False)
        self.wkv_a_with_mqa = nn.Linear(d, args.kv_lora_rank + self.rope, bias=False)
        self.kv_a_norm = RMSNorm(args.kv_lora_rank, args.norm_eps)
        self.wkv_b = nn.Linear(args.kv_lora_rank, h * (self.nope + self.v_dim), bias=False)
        self.wo = nn.Linear(h * self.v_dim, d, bias=False)

    def queries(self, x: torch.Tensor, cis: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(B, T, H, nope + rope): the rope part rotated, then the whole query scaled for its
        position (Llama-4 scaling)."""
        B, T, _ = x.shape
        q = self.wq_b(self.q_a_norm(self.wq_a(x))).view(B, T, self.n_heads, -1)
        q_nope, q_rope = q.split([self.nope, self.rope], dim=-1)
        q = torch.cat([q_nope, apply_rotary_emb(q_rope, cis)], dim=-1)
        return llama_4_scaled(q, positions, self.llama_4_scaling)

    def latent(self, x: torch.Tensor, cis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The normed kv latent (B, T, kv_lora_rank) and the rotated shared key (B, T, rope)."""
        kv, k_rope = self.wkv_a_with_mqa(x).split([self.kv_lora_rank, self.rope], dim=-1)
        return self.kv_a_norm(kv), apply_rotary_emb(k_rope[:, :, None], cis)[:, :, 0]

    def attend(
        self,
        q: torch.Tensor,  # (B, T, H, nope + rope)
        kv_latent: torch.Tensor,  # (B, T, kv_lora_rank)
        k_rope: torch.Tensor,  # (B, T, rope)
        positions: torch.Tensor,  # (T,)
        cached: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Output (B, T, dim): the queries attend over the cached latents and the chunk's own,
        expanded into every head's keys and values."""
        B, T = q.shape[:2]
        key_pos = positions
        if cached is not None:
            cache_latent, cache_rope, cache_pos = cached  # (B, S, kv_lora), (B, S, rope), (S,)
            kv_latent = torch.cat([cache_latent, kv_latent], dim=1)
            k_rope = torch.cat([cache_rope, k_rope], dim=1)
            key_pos = torch.cat([cache_pos, positions])
        S = kv_latent.shape[1]
        kv = self.wkv_b(kv_latent).view(B, S, self.n_heads, self.nope + self.v_dim)
        k_nope, values = kv.split([self.nope, self.v_dim], dim=-1)
        keys = torch.cat([k_nope, k_rope[:, :, None].expand(B, S, self.n_heads, self.rope)], -1)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, keys) * self.scale  # (B, H, T, S)
        visible = (key_pos[None, :] >= 0) & (key_pos[None, :] <= positions[:, None])
        scores = scores.masked_fill(~visible, float("-inf"))
        probs = F.softmax(at_least_fp32(scores), dim=-1).type_as(q)
        return self.wo(torch.einsum("bhqk,bkhd->bqhd", probs, values).reshape(B, T, -1))

    def pieces(self, x: str, out: str) -> tuple[Piece, ...]:
        """The query path, the kv-latent path, and the attention that expands and uses them."""
        return (
            Piece("q_path", self.queries, (x, "rope", "positions"), ("q",)),
            Piece("kv_latent", self.latent, (x, "rope"), ("kv_latent", "k_rope")),
            Piece(
                "attention",
                self.attend,
                ("q", "kv_latent", "k_rope", "positions", "cached"),
                (out,),
            ),
        )
