"""The HF transformers layout of latent attention + fine-grained experts (Mistral Small 4,
Large 3): transformers' `Mistral4ForCausalLM` (5.x `models/mistral4/modeling_mistral4.py`,
`configuration_mistral4.py`).

No rotary permutation: with `rope_interleave` true transformers rotates the interleaved pairs
the official weights hold. The routed experts are stacked: `mlp.experts.gate_up_proj`
[E, 2·I, D] holds each expert's w1 rows then its w3 rows, `mlp.experts.down_proj` [E, D, I]
each expert's w2. In row-major order both are the official tensors' bytes back to back
(`stacked_experts`), so the export streams them part by part and never reshapes.
"""

import re

from checkpoint.args import ModelArgs

Shape = tuple[int, ...]

LAYER_NAMES = {
    "attention.wq_a.weight": "self_attn.q_a_proj.weight",
    "attention.q_a_norm.weight": "self_attn.q_a_layernorm.weight",
    "attention.wq_b.weight": "self_attn.q_b_proj.weight",
    "attention.wkv_a_with_mqa.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "attention.kv_a_norm.weight": "self_attn.kv_a_layernorm.weight",
    "attention.wkv_b.weight": "self_attn.kv_b_proj.weight",
    "gate.weight": "mlp.gate.weight",
    "shared_experts.w1.weight": "mlp.shared_experts.gate_proj.weight",
    "shared_experts.w2.weight": "mlp.shared_experts.down_proj.weight",
    "shared_experts.w3.weight": "mlp.shared_experts.up_proj.weight",
}
EXPERT = re.compile(r"experts\.(\d+)\.(w[123])\.weight")
# Each expert's tensor → the stacked HF tensor it is a part of.
STACKED = {
    "w1": "mlp.experts.gate_up_proj",
    "w3": "mlp.experts.gate_up_proj",
    "w2": "mlp.experts.down_proj",
}
NORM_EPS = 1e-6  # transformers' Mistral4 q_a / kv_a norms: Mistral4RMSNorm's default


def stacked_experts(args: ModelArgs) -> dict[str, tuple[Shape, tuple[str, ...]]]:
    """HF name → (shape, the official names whose bytes, back to back, make it) of every
    stacked expert tensor; empty for models without fine-grained experts."""
    moe = args.moe
    if moe is None or not moe.fine_grained:
        return {}
    n, width, dim = moe.num_experts, moe.expert_hidden_dim, args.dim
    stacked = {}
    for i in range(args.dense_layers, args.n_layers):
        prefix = f"layers.{i}.experts"
        gate_up = tuple(f"{prefix}.{e}.{w}.weight" for e in range(n) for w in ("w1", "w3"))
        down = tuple(f"{prefix}.{e}.w2.weight" for e in range(n))
        stacked[f"model.layers.{i}.mlp.experts.gate_up_proj"] = ((n, 2 * width, dim), gate_up)
        stacked[f"model.layers.{i}.mlp.experts.down_proj"] = ((n, dim, width), down)
    return stacked


def mistral4_rope(args: ModelArgs, rope: dict | None) -> dict:
    """`rope_parameters` for transformers' Mistral4 from the Ministral3 ones (`rope`, None
    without yarn and llama_4_scaling), so that transformers computes this toolkit's reading:
    cos/sin never scaled (attention_factor 1: YaRN's magnitude goes on the softmax scale), and
    the softmax scale × magnitude² (mscale_all_dim 1) only with `apply_scale: true` —
    mscale_all_dim 0 keeps the base scale, as vLLM reads `apply_scale: false`."""
    if rope is None:  # transformers divides positions by this length even when β is 0
        rope = {
            "rope_theta": args.rope_theta,
            "original_max_position_embeddings": args.max_position_embeddings or 1048576,
            "llama_4_scaling_beta": 0.0,
        }
    if rope.get("rope_type", "default") == "default":
        # transformers' "default" rope for Mistral4 spans the whole head_dim (it ignores
        # partial_rotary_factor); "linear" with factor 1 gives the plain frequencies over the
        # rope dimensions only.
        return rope | {"rope_type": "linear", "factor": 1.0}
    return rope | {
        "attention_factor": 1.0,
        "mscale": 1.0,
        "mscale_all_dim": 1.0 if args.yarn.apply_scale else 0.0,
    }


def mistral4_config(args: ModelArgs, rope: dict | None, torch_dtype: str) -> dict:
    """config.json for transformers' Mistral4ForCausalLM (`rope`: as `mistral4_rope`).
    ValueError when transformers cannot express the model exactly."""
    moe = args.moe
    if not args.latent or moe is None or not moe.fine_grained:
        raise ValueError(
            "transformers' Mistral4 needs latent attention and fine-grained experts together"
        )
    if not moe.num_shared_experts:
        raise ValueError("transformers' Mistral4 always has shared experts; this model has none")
    if args.norm_eps != NORM_EPS:
        raise ValueError(
            f"transformers' Mistral4 normalises q_a / kv_a with eps {NORM_EPS}, this model with "
            f"norm_eps {args.norm_eps}"
        )
    config = {
        "architectures": ["Mistral4ForCausalLM"],
        "model_type": "mistral4",
        "hidden_size": args.dim,
        "intermediate_size": args.hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "rms_norm_eps": args.norm_eps,
        "vocab_size": args.vocab_size,
        "q_lora_rank": args.q_lora_rank,
        "kv_lora_rank": args.kv_lora_rank,
        "qk_nope_head_dim": args.qk_nope_head_dim,
        "qk_rope_head_dim": args.qk_rope_head_dim,
        "v_head_dim": args.v_head_dim,
        "rope_parameters": mistral4_rope(args, rope),
        "rope_interleave": True,
        "n_routed_experts": moe.num_experts,
        "num_experts_per_tok": moe.num_experts_per_tok,
        "n_shared_experts": moe.num_shared_experts,
        "moe_intermediate_size": moe.expert_hidden_dim,
        "first_k_dense_replace": moe.first_k_dense_replace,
        "routed_scaling_factor": moe.routed_scale,
        "n_group": moe.num_expert_groups,
        "topk_group": moe.num_expert_groups_per_tok,
        "norm_topk_prob": True,
    }
    if args.max_position_embeddings is not None:  # else transformers' default (unused)
        config["max_position_embeddings"] = args.max_position_embeddings
    return config | {
        "hidden_act": "silu",
        "attention_bias": False,
        "tie_word_embeddings": args.tied_embeddings,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": torch_dtype,
    }
