"""A faithful torch port of the official Mistral reference.

Mirrors mistral-src `one_file_ref.py` and mistral-inference `transformer.py` class for class:
fp32 RMSNorm, interleaved-pair RoPE in fp32, GQA by `repeat_interleave`, softmax in fp32, a
sliding window of W keys including the current token (the official xformers model; not
`one_file_ref.py`'s W+1), each layer with its own window (a params.json list), a rolling-buffer
KV cache, an untied head and fp32 logits.
"""

import torch
import torch.nn.functional as F
from torch import nn

from checkpoint.args import ModelArgs
from checkpoint.pieces import Piece, run_pieces
from reference_torch.cache import RollingKVCache
from reference_torch.latent import LatentAttention
from reference_torch.moe import FineGrainedMoe, MoeLayer
from reference_torch.norm import RMSNorm
from reference_torch.precision import at_least_fp32
from reference_torch.rope import apply_rotary_emb, freqs_cis, llama_4_scaled


def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Bool (Tq, Tk): key visible iff it is filled, causal, and fewer than W positions back."""
    q, k = q_pos[:, None], k_pos[None, :]
    visible = (k >= 0) & (k <= q)
    if window is not None:
        visible &= q - k < window
    return visible


class Attention(nn.Module):
    cached_values = ("k", "v")  # what the cache holds per token

    def __init__(self, args: ModelArgs, window: int | None):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.sliding_window = window  # this layer's (params.json may give one per layer)
        self.llama_4_scaling = args.llama_4_scaling
        self.scale = args.head_dim**-0.5
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def project(
        self, x: torch.Tensor, cis: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries (B, T, H, D), keys and values (B, T, Hkv, D) of x (B, T, dim), queries and
        keys rotated by `cis` (T, D / 2), queries then scaled for their positions (Llama-4
        scaling, where the config has it)."""
        B, T, _ = x.shape
        xq = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        xk = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        xv = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        xq = llama_4_scaled(apply_rotary_emb(xq, cis), positions, self.llama_4_scaling)
        return xq, apply_rotary_emb(xk, cis), xv

    def attend(
        self,
        xq: torch.Tensor,  # (B, T, H, D)
        xk: torch.Tensor,  # (B, T, Hkv, D)
        xv: torch.Tensor,  # (B, T, Hkv, D)
        positions: torch.Tensor,  # (T,)
        cached: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Output (B, T, dim): the queries attend over the cached keys and the chunk's own."""
        B, T = xq.shape[:2]
        keys, values, key_pos = xk, xv, positions
        if cached is not None:
            cache_k, cache_v, cache_pos = cached  # (B, S, Hkv, D), (S,)
            keys = torch.cat([cache_k, xk], dim=1)
            values = torch.cat([cache_v, xv], dim=1)
            key_pos = torch.cat([cache_pos, positions])
        rep = self.n_heads // self.n_kv_heads
        keys = keys.repeat_interleave(rep, dim=2)  # (B, S+T, H, D)
        values = values.repeat_interleave(rep, dim=2)

        scores = torch.einsum("bqhd,bkhd->bhqk", xq, keys) * self.scale  # (B, H, T, S+T)
        visible = attention_mask(positions, key_pos, self.sliding_window)
        scores = scores.masked_fill(~visible, float("-inf"))
        probs = F.softmax(at_least_fp32(scores), dim=-1).type_as(xq)
        out = torch.einsum("bhqk,bkhd->bqhd", probs, values).reshape(B, T, -1)
        return self.wo(out)

    def pieces(self, x: str, out: str) -> tuple[Piece, ...]:
        return (
            Piece("qkv", self.project, (x, "rope", "positions"), ("q", "k", "v")),
            Piece("attention", self.attend, ("q", "k", "v", "positions", "cached"), (out,)),
        )


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs, hidden_dim: int | None = None):
        super().__init__()
        hidden_dim = hidden_dim or args.hidden_dim
        self.w1 = nn.Linear(args.dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def pieces(self, x: str, out: str) -> tuple[Piece, ...]:
        return (Piece("feed_forward", self, (x,), (out,)),)


class TransformerBlock(nn.Module):
    """Attention (grouped-query or latent) and an FFN (dense, Mixtral's MoE, or the
    fine-grained MoE whose gate and experts sit at the block's top level)."""

    def __init__(self, args: ModelArgs, window: int | None, routed: bool):
        super().__init__()
        self.attention = LatentAttention(args, window) if args.latent else Attention(args, window)
        self.moe = None
        if routed and args.moe.fine_grained:
            self.gate = nn.Linear(args.dim, args.moe.num_experts, bias=False)
            hidden = args.moe.expert_hidden_dim
            self.experts = nn.ModuleList(
                FeedForward(args, hidden) for _ in range(args.moe.num_experts)
            )
            shared = args.moe.num_shared_experts * hidden
            self.shared_experts = FeedForward(args, shared) if shared else None
            self.moe = FineGrainedMoe(args, self.gate, self.experts, self.shared_experts)
        else:
            self.feed_forward = MoeLayer(args, FeedForward) if routed else FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def pieces(self) -> tuple[Piece, ...]:
        """The forward, step by step (`checkpoint.pieces`); verify judges each step."""
        ffn = self.moe if self.moe is not None else self.feed_forward
        return (
            Piece("attention_norm", self.attention_norm, ("x",), ("x_normed",)),
            *self.attention.pieces("x_normed", "attn"),
            Piece("attention_residual", torch.add, ("x", "attn"), ("h",), judged=False),
            Piece("ffn_norm", self.ffn_norm, ("h",), ("h_normed",)),
            *ffn.pieces("h_normed", "ffn"),
            Piece("ffn_residual", torch.add, ("h", "ffn"), ("out",), judged=False),
        )

    def forward(self, x, cis, positions, cached=None):
        """(B, T, dim) → (B, T, dim), plus what the cache keeps of the chunk (keys and values,
        or the latent and the rope key)."""
        values = run_pieces(
            self.pieces(), {"x": x, "rope": cis, "positions": positions, "cached": cached}
        )
        first, second = self.attention.cached_values
        return values["out"], values[first], values[second]


def make_block(args: ModelArgs, i: int) -> TransformerBlock:
    """Block i as the model builds it: the one constructor of a layer (whole model or streamed):
    its window, and its FFN kind (dense for the first `dense_layers`, else routed if MoE)."""
    routed = args.moe is not None and i >= args.dense_layers
    return TransformerBlock(args, args.layer_windows[i], routed)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(make_block(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        # Tied embeddings: the head reads the embedding table (no tensor of its own).
        self.output = (
            None if args.tied_embeddings else nn.Linear(args.dim, args.vocab_size, bias=False)
        )

    @classmethod
    def from_folder(
        cls, folder, *, dtype="bfloat16", device: str | torch.device = "cpu"
    ) -> "Transformer":
        """Load an official (or converted) folder, strict on keys and shapes; `dtype` a name
        ("bfloat16", "float32", …) or a torch dtype."""
        from reference_torch.loading import ReferenceLoader

        return ReferenceLoader(folder).model(dtype=dtype, device=device)

    def forward(self, tokens: torch.Tensor, cache: RollingKVCache | None = None) -> torch.Tensor:
        """fp32 logits (B, T, vocab) for `tokens` (B, T); with a cache, continue from it."""
        return self.forward_hidden(tokens, cache)[0]

    def forward_hidden(
        self, tokens: torch.Tensor, cache: RollingKVCache | None = None, start: int = 0
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits and every hidden state: embeddings, after each block, after the final norm;
        positions start, start+1, … (or after what `cache` holds).

        Made of the pieces verify calls one by one: `embed`, each block with `rotary`, `head`.
        """
        T = tokens.shape[1]
        positions = (
            cache.next_positions(T)
            if cache is not None
            else torch.arange(start, start + T, device=tokens.device)
        )
        cis = self.rotary(positions)
        h = self.embed(tokens)
        hidden = [h]
        for i, layer in enumerate(self.layers):
            cached = cache.layer(i) if cache is not None else None
            h, xk, xv = layer(h, cis, positions, cached)
            if cache is not None:
                cache.write(i, xk, xv, positions)
            hidden.append(h)
        if cache is not None:
            cache.advance(positions)
        h, logits = self.head(h)
        hidden.append(h)
        return logits, hidden

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) → (B, T, dim)."""
        return self.tok_embeddings(tokens)

    def rotary(self, positions: torch.Tensor) -> torch.Tensor:
        """The rotations every block applies at these positions (T, head_dim / 2); computed
        in float32, or float64 for a float64 model."""
        return freqs_cis(positions, self.args, at_least_fp32(self.norm.weight[:0]).dtype)

    def head(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Final norm, and fp32 logits (the reference's `.float()`; float64 stays)."""
        normed = self.norm(h)
        weight = self.tok_embeddings.weight if self.output is None else self.output.weight
        return normed, at_least_fp32(F.linear(normed, weight))
