"""Tiny latent-attention + fine-grained MoE configs (Mistral Small 4 / Large 3 shapes) and the
same model in HF transformers' `Mistral4ForCausalLM`, built from the same numbers."""

import dataclasses

import torch
import transformers
from support import hf_rope_parameters, tiny_args

from checkpoint.sections import Llama4ScalingArgs, MoeArgs, YarnArgs

ORIGINAL = 32
# Large-3-like: dense-first layers, MLA, 8 routed experts in 2 groups, a shared expert,
# routed_scale ≠ 1, YaRN without the magnitude correction, Llama-4 scaling.
LARGE3 = tiny_args(
    dim=64,
    n_layers=3,
    n_heads=4,
    n_kv_heads=4,
    head_dim=None,
    hidden_dim=96,
    vocab_size=131072,
    norm_eps=1e-6,
    rope_theta=10000.0,
    q_lora_rank=32,
    kv_lora_rank=24,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=12,
    moe=MoeArgs(
        num_experts=8,
        num_experts_per_tok=2,
        num_shared_experts=1,
        expert_hidden_dim=16,
        first_k_dense_replace=1,
        routed_scale=2.5,
        num_expert_groups=2,
        num_expert_groups_per_tok=1,
    ),
    yarn=YarnArgs(factor=8.0, original_max_position_embeddings=ORIGINAL, apply_scale=False),
    llama_4_scaling=Llama4ScalingArgs(original_max_position_embeddings=ORIGINAL, beta=0.1),
    max_position_embeddings=8 * ORIGINAL,
)
# Small-4-like: every layer routed, one group.
SMALL4 = dataclasses.replace(
    LARGE3,
    moe=dataclasses.replace(
        LARGE3.moe, first_k_dense_replace=0, num_expert_groups=1, routed_scale=1.0
    ),
)


def hf_mistral4(args, state, mscale_all_dim: float = 0.0) -> torch.nn.Module:
    """`Mistral4ForCausalLM` from the same numbers (fp32); by default the softmax scale left
    without YaRN's magnitude (`mscale_all_dim` 0), as this toolkit reads `apply_scale: false`
    (1: HF's own reading, × magnitude²)."""
    moe = args.moe
    rope = hf_rope_parameters(args, mscale=1.0, mscale_all_dim=mscale_all_dim, attention_factor=1.0)
    scaling = args.llama_4_scaling
    rope["llama_4_scaling_beta"] = scaling.beta if scaling else 0.0
    if scaling:
        rope.setdefault(
            "original_max_position_embeddings", scaling.original_max_position_embeddings
        )
    config = transformers.Mistral4Config(
        vocab_size=args.vocab_size,
        hidden_size=args.dim,
        intermediate_size=args.hidden_dim,
        moe_intermediate_size=moe.expert_hidden_dim,
        num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads,
        num_key_value_heads=args.n_kv_heads,
        n_shared_experts=moe.num_shared_experts,
        n_routed_experts=moe.num_experts,
        routed_scaling_factor=moe.routed_scale,
        kv_lora_rank=args.kv_lora_rank,
        q_lora_rank=args.q_lora_rank,
        qk_rope_head_dim=args.qk_rope_head_dim,
        v_head_dim=args.v_head_dim,
        qk_nope_head_dim=args.qk_nope_head_dim,
        n_group=moe.num_expert_groups,
        topk_group=moe.num_expert_groups_per_tok,
        num_experts_per_tok=moe.num_experts_per_tok,
        first_k_dense_replace=moe.first_k_dense_replace,
        norm_topk_prob=True,
        max_position_embeddings=args.max_position_embeddings or 4096,
        rms_norm_eps=args.norm_eps,
        tie_word_embeddings=args.tied_embeddings,
        rope_parameters=rope,
        rope_interleave=True,
    )
    model = transformers.Mistral4ForCausalLM(config).eval()
    attention = {
        "wq_a": "q_a_proj",
        "q_a_norm": "q_a_layernorm",
        "wq_b": "q_b_proj",
        "wkv_a_with_mqa": "kv_a_proj_with_mqa",
        "kv_a_norm": "kv_a_layernorm",
        "wkv_b": "kv_b_proj",
        "wo": "o_proj",
    }
    mlp = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
    hf = {"model.embed_tokens.weight": state["tok_embeddings.weight"]}
    hf["model.norm.weight"] = state["norm.weight"]
    if not args.tied_embeddings:
        hf["lm_head.weight"] = state["output.weight"]
    for i in range(args.n_layers):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        hf[q + "input_layernorm.weight"] = state[p + "attention_norm.weight"]
        hf[q + "post_attention_layernorm.weight"] = state[p + "ffn_norm.weight"]
        for ours, theirs in attention.items():
            hf[f"{q}self_attn.{theirs}.weight"] = state[f"{p}attention.{ours}.weight"]
        if i < args.dense_layers:
            for ours, theirs in mlp.items():
                hf[f"{q}mlp.{theirs}.weight"] = state[f"{p}feed_forward.{ours}.weight"]
            continue
        hf[f"{q}mlp.gate.weight"] = state[f"{p}gate.weight"]
        for ours, theirs in mlp.items():
            hf[f"{q}mlp.shared_experts.{theirs}.weight"] = state[f"{p}shared_experts.{ours}.weight"]
        experts = range(moe.num_experts)
        hf[f"{q}mlp.experts.gate_up_proj"] = torch.stack(
            [
                torch.cat([state[f"{p}experts.{e}.w1.weight"], state[f"{p}experts.{e}.w3.weight"]])
                for e in experts
            ]
        )
        hf[f"{q}mlp.experts.down_proj"] = torch.stack(
            [state[f"{p}experts.{e}.w2.weight"] for e in experts]
        )
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in hf.items()}, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return model
