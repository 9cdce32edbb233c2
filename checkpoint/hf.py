"""The HF transformers layout of a Mistral/Mixtral checkpoint: names, config.json, and the
rotary permutation of wq/wk.

Official weights rotate interleaved pairs (x[2i], x[2i+1]); HF's `rotate_half` rotates halves
(x[i], x[i + head_dim/2]). Permuting the output rows of wq and wk per head maps one onto the
other (HF `convert_mistral_weights_to_hf.py` uses the same `view(h, hd/2, 2, dim)` transpose).
Names and config keys from transformers `MistralConfig` / `MixtralConfig`.
"""

import re

import numpy as np

from checkpoint.args import ModelArgs, MoeArgs

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
}
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


# Keys transformers writes that change nothing in these models' forward.
HARMLESS_KEYS = frozenset(
    {
        "architectures",
        "torch_dtype",  # transformers 4.x
        "dtype",  # transformers 5.x
        "transformers_version",
        "_name_or_path",
        "initializer_range",
        "use_cache",
        "pad_token_id",
        "bos_token_id",  # the tokenizer file is the authority on special tokens
        "eos_token_id",
        "attention_dropout",  # training only
        "max_position_embeddings",
        "return_dict",
        "output_hidden_states",
        "output_attentions",
        "id2label",
        "label2id",
        "problem_type",
        "chunk_size_feed_forward",
        "is_encoder_decoder",
    }
)
_MOE_KEYS = {"num_local_experts", "num_experts_per_tok"}
_MOE_HARMLESS = {"output_router_logits", "router_aux_loss_coef", "router_jitter_noise"}
MAPPED_KEYS = {
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "head_dim",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "rms_norm_eps",
    "vocab_size",
    "sliding_window",
    "rope_theta",  # transformers 4.x
    "rope_parameters",  # transformers 5.x
    "rope_scaling",  # only null / default
    "hidden_act",  # only silu
    "attention_bias",  # only false
    "mlp_bias",  # only false
    "tie_word_embeddings",
}
MODEL_TYPES = {
    "mistral": MAPPED_KEYS,
    "mixtral": MAPPED_KEYS | _MOE_KEYS | _MOE_HARMLESS,
    "ministral": MAPPED_KEYS | {"layer_types"},
}
FULL_CONTEXT = 32768  # max_position_embeddings written when no window is longer


def hf_config(args: ModelArgs, torch_dtype: str) -> dict:
    """config.json for transformers' MistralForCausalLM, MixtralForCausalLM (experts) or
    MinistralForCausalLM (per-layer windows: `layer_types`). ValueError when transformers
    cannot express the windows exactly."""
    windows = args.layer_windows
    context = max([FULL_CONTEXT, *(w for w in windows if w is not None)])
    model_type = "mixtral" if args.moe else "mistral"
    window_keys: dict = {"sliding_window": windows[0]}
    if len(args.window_pattern) > 1:
        # A window as long as the context is full attention for every sequence the config
        # allows; the others must share one window (HF's Ministral has one).
        sliding = sorted({w for w in windows if w is not None and w < context})
        if len(sliding) != 1 or args.moe:
            raise ValueError(
                f"transformers cannot express these per-layer windows exactly "
                f"({list(args.window_pattern)}): its Ministral has one window for every "
                "windowed layer and no experts"
            )
        model_type = "ministral"
        window_keys = {
            "sliding_window": sliding[0],
            "layer_types": [
                "sliding_attention" if w is not None and w < context else "full_attention"
                for w in windows
            ],
        }
    config = {
        "architectures": [f"{model_type.capitalize()}ForCausalLM"],
        "model_type": model_type,
        "hidden_size": args.dim,
        "intermediate_size": args.hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        **window_keys,
        "vocab_size": args.vocab_size,
        "max_position_embeddings": context,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": torch_dtype,
    }
    if args.moe:
        config |= {
            "num_local_experts": args.moe.num_experts,
            "num_experts_per_tok": args.moe.num_experts_per_tok,
        }
    return config


def args_from_hf_config(config: dict) -> tuple[ModelArgs, bool]:
    """The params.json view of a transformers Mistral/Mixtral/Ministral config.json (4.x or
    5.x), and whether the head is tied to the embeddings. ValueError naming any key this
    mapping does not know, or a value that would change the model unnoticed."""
    if not isinstance(config, dict):
        raise ValueError("config.json is not a JSON object")
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(
            f"model_type {model_type!r} is not supported (only {', '.join(MODEL_TYPES)})"
        )
    unknown = sorted(set(config) - MODEL_TYPES[model_type] - HARMLESS_KEYS)
    if unknown:
        raise ValueError(f"unsupported key(s) for {model_type}: {', '.join(unknown)}")
    for key, allowed in (("hidden_act", ("silu",)), ("attention_bias", (False,))):
        if key in config and config[key] not in allowed:
            raise ValueError(f"{key} {config[key]!r} is not supported (only {allowed[0]!r})")
    if config.get("mlp_bias", False) is not False:
        raise ValueError(f"mlp_bias {config['mlp_bias']!r} is not supported (only False)")
    moe = None
    if model_type == "mixtral":
        moe = MoeArgs(
            num_experts=config["num_local_experts"],
            num_experts_per_tok=config["num_experts_per_tok"],
        )
    heads = config["num_attention_heads"]
    if isinstance(heads, bool) or not isinstance(heads, int) or heads <= 0:
        raise ValueError(f"num_attention_heads must be a positive integer, got {heads!r}")
    args = ModelArgs(
        dim=config["hidden_size"],
        n_layers=config["num_hidden_layers"],
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        hidden_dim=config["intermediate_size"],
        n_heads=heads,
        n_kv_heads=config["num_key_value_heads"],
        norm_eps=config["rms_norm_eps"],
        vocab_size=config["vocab_size"],
        sliding_window=_windows(config),
        rope_theta=_rope_theta(config),
        moe=moe,
    )
    return args, bool(config.get("tie_word_embeddings", False))


def _windows(config: dict):
    window = config.get("sliding_window")
    if "layer_types" not in config:
        return window
    kinds = config["layer_types"]
    if not isinstance(kinds, list) or not set(kinds) <= {"sliding_attention", "full_attention"}:
        raise ValueError(f"layer_types must list sliding_attention / full_attention: {kinds!r}")
    if len(kinds) != config["num_hidden_layers"]:
        raise ValueError(
            f"layer_types has {len(kinds)} entries for {config['num_hidden_layers']} layers"
        )
    return [window if kind == "sliding_attention" else None for kind in kinds]


def _rope_theta(config: dict) -> float:
    """θ from `rope_theta` (4.x) or `rope_parameters` (5.x); only the default (unscaled) RoPE."""
    scaling = config.get("rope_scaling")
    parameters = config.get("rope_parameters") or {}
    if not isinstance(parameters, dict):
        raise ValueError(f"rope_parameters must be an object, got {parameters!r}")
    for what, spec in (("rope_scaling", scaling), ("rope_parameters", parameters)):
        if spec is None:
            continue
        if not isinstance(spec, dict):
            raise ValueError(f"{what} must be an object or null, got {spec!r}")
        kind = spec.get("rope_type", spec.get("type", "default"))
        extra = sorted(set(spec) - {"rope_type", "type", "rope_theta"})
        if kind != "default" or extra:
            raise ValueError(f"{what} {spec!r} is not supported (only the default RoPE)")
    thetas = {config["rope_theta"]} if "rope_theta" in config else set()
    thetas |= {parameters["rope_theta"]} if "rope_theta" in parameters else set()
    if len(thetas) > 1:
        raise ValueError(f"rope_theta and rope_parameters.rope_theta differ: {sorted(thetas)}")
    if not thetas:
        raise ValueError("no rope_theta (neither rope_theta nor rope_parameters.rope_theta)")
    return thetas.pop()
