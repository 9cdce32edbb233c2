"""The HF transformers config.json of a Mistral/Mixtral checkpoint, written from params.json
and read back into it (tensor names and the rotary permutation: `checkpoint.hf_names`).

Config keys from transformers `MistralConfig` / `MixtralConfig` / `MinistralConfig` and, for
params.json with `yarn` or `llama_4_scaling`, `Ministral3Config` (transformers 5.x:
`rope_parameters` as `modeling_rope_utils._compute_yarn_parameters` and
`Ministral3Attention` read it). Latent attention with fine-grained experts:
`checkpoint.hf_mistral4` (transformers' Mistral4).
"""

import dataclasses
import math

from checkpoint import hf_mistral4
from checkpoint.args import ModelArgs, MoeArgs
from checkpoint.sections import Llama4ScalingArgs, YarnArgs

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
    "max_position_embeddings",  # mistral family: kept where not the export's default
}
MODEL_TYPES = {
    "mistral": MAPPED_KEYS,
    "mixtral": MAPPED_KEYS | _MOE_KEYS | _MOE_HARMLESS,
    "ministral": MAPPED_KEYS | {"layer_types"},
    # Ministral 3 / Devstral 2 text models: YaRN and Llama-4 scaling in `rope_parameters`.
    "ministral3": MAPPED_KEYS,
}
FULL_CONTEXT = 32768  # max_position_embeddings written when no window is longer
# rope_parameters keys of transformers' Ministral3 (yarn: `_compute_yarn_parameters`; both:
# `Ministral3Attention` reads llama_4_scaling_beta and original_max_position_embeddings);
# `max_position_embeddings` inside it is ignored by transformers.
_ROPE_KEYS = {
    "yarn": {
        "rope_type",
        "type",
        "rope_theta",
        "factor",
        "original_max_position_embeddings",
        "beta_fast",
        "beta_slow",
        "mscale",
        "mscale_all_dim",
        "attention_factor",
        "truncate",
        "llama_4_scaling_beta",
        "partial_rotary_factor",
        "max_position_embeddings",
    },
    "default": {
        "rope_type",
        "type",
        "rope_theta",
        "original_max_position_embeddings",
        "llama_4_scaling_beta",
        "partial_rotary_factor",
        "max_position_embeddings",
    },
}


def rope_parameters(args: ModelArgs) -> dict | None:
    """transformers' Ministral3 `rope_parameters` for params.json's `yarn` and/or
    `llama_4_scaling` (None when it has neither). ValueError when transformers cannot express
    them: its Llama-4 scaling reads yarn's original length, so another one is refused.

    yarn → rope_type "yarn": factor, original_max_position_embeddings, beta_fast (yarn.beta),
    beta_slow (yarn.alpha), and the attention factor given explicitly (0.1·ln(factor) + 1 if
    apply_scale, else 1.0; mscale = mscale_all_dim = 1.0 are written as transformers' own
    Ministral3 configs have them, and do not count once attention_factor is given).
    llama_4_scaling without yarn → rope_type "default" plus the two keys the attention reads.
    """
    yarn, scaling = args.yarn, args.llama_4_scaling
    if yarn is None and scaling is None:
        return None
    if yarn is None:
        return {
            "rope_type": "default",
            "rope_theta": args.rope_theta,
            "original_max_position_embeddings": scaling.original_max_position_embeddings,
            "llama_4_scaling_beta": scaling.beta,
        }
    if scaling is not None and (
        scaling.original_max_position_embeddings != yarn.original_max_position_embeddings
    ):
        raise ValueError(
            "transformers cannot express this llama_4_scaling: its Ministral3 and Mistral4 read "
            "the Llama-4 scaling length from yarn's original_max_position_embeddings "
            f"({yarn.original_max_position_embeddings}), but "
            "llama_4_scaling.original_max_position_embeddings is "
            f"{scaling.original_max_position_embeddings}"
        )
    return {
        "rope_type": "yarn",
        "rope_theta": args.rope_theta,
        "factor": yarn.factor,
        "original_max_position_embeddings": yarn.original_max_position_embeddings,
        "beta_fast": yarn.beta,
        "beta_slow": yarn.alpha,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "attention_factor": float(yarn.attention_factor),
        "llama_4_scaling_beta": scaling.beta if scaling else 0.0,
    }


def hf_config(args: ModelArgs, torch_dtype: str) -> dict:
    """config.json for transformers' MistralForCausalLM, MixtralForCausalLM (experts),
    MinistralForCausalLM (per-layer windows: `layer_types`) or Ministral3ForCausalLM (`yarn`
    and/or `llama_4_scaling`: `rope_parameters`). The text model only: a vision encoder and FP8
    quantization are not part of it (the converter leaves the one out and dequantizes the
    other). ValueError when transformers cannot express the model exactly."""
    rope = rope_parameters(args)
    if args.latent or (args.moe is not None and args.moe.fine_grained):
        return hf_mistral4.mistral4_config(args, rope, torch_dtype)
    if rope is not None:
        return _ministral3_config(args, rope, torch_dtype)
    windows = args.layer_windows
    context = args.max_position_embeddings or default_context(windows)
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
        **_common_keys(args),
        "rope_theta": args.rope_theta,
        **window_keys,
        "vocab_size": args.vocab_size,
        "max_position_embeddings": context,
        "hidden_act": "silu",
        "tie_word_embeddings": args.tied_embeddings,
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


def default_context(windows) -> int:
    """max_position_embeddings the export writes for a params.json without one: 32768, or the
    longest window if longer."""
    return max([FULL_CONTEXT, *(w for w in windows if w is not None)])


def _context(config: dict, windows) -> int | None:
    """params.json's max_position_embeddings from a Mistral/Mixtral/Ministral config: its
    value where it is not what the export writes for a params.json without one (transformers'
    own 32768 included), so official → HF → official keeps it and HF folders saved with the
    default gain no limit."""
    value = config.get("max_position_embeddings")
    layers = windows if isinstance(windows, list) else [windows]
    if value is None or not all(w is None or type(w) is int for w in layers):
        return value  # malformed windows: ModelArgs names them
    return None if value == default_context(layers) else value


def _common_keys(args: ModelArgs) -> dict:
    return {
        "hidden_size": args.dim,
        "intermediate_size": args.hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "rms_norm_eps": args.norm_eps,
    }


def _ministral3_config(args: ModelArgs, rope: dict, torch_dtype: str) -> dict:
    if args.moe:
        raise ValueError(
            "transformers cannot express experts with yarn / llama_4_scaling: its Ministral3 "
            "is dense"
        )
    if len(args.window_pattern) > 1:
        raise ValueError(
            f"transformers cannot express these per-layer windows exactly "
            f"({list(args.window_pattern)}) with yarn / llama_4_scaling: its Ministral3 has "
            "one window for every layer"
        )
    config = {
        "architectures": ["Ministral3ForCausalLM"],
        "model_type": "ministral3",
        **_common_keys(args),
        "rope_parameters": rope,
        "sliding_window": args.layer_windows[0],
        "vocab_size": args.vocab_size,
    }
    if args.max_position_embeddings is not None:  # else transformers' default (unused)
        config["max_position_embeddings"] = args.max_position_embeddings
    return config | {
        "hidden_act": "silu",
        "tie_word_embeddings": args.tied_embeddings,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": torch_dtype,
    }


def args_from_hf_config(config: dict) -> ModelArgs:
    """The params.json view of a transformers Mistral/Mixtral/Ministral/Ministral3 config.json
    (4.x or 5.x): a head tied to the embeddings is `tied_embeddings`, Ministral3's
    `rope_parameters` are `yarn` / `llama_4_scaling`. ValueError naming any key this mapping
    does not know, or a value that would change the model unnoticed."""
    if not isinstance(config, dict):
        raise ValueError("config.json is not a JSON object")
    model_type = config.get("model_type")
    if model_type == "mistral4":
        raise ValueError(
            "model_type 'mistral4' (latent attention + fine-grained experts) is not read back: "
            "convert its official folder (params.json) instead"
        )
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
    tied = config.get("tie_word_embeddings", False)
    if not isinstance(tied, bool):
        raise ValueError(f"tie_word_embeddings must be true or false, got {tied!r}")
    moe = None
    if model_type == "mixtral":
        moe = MoeArgs(
            num_experts=config["num_local_experts"],
            num_experts_per_tok=config["num_experts_per_tok"],
        )
    heads = config["num_attention_heads"]
    if isinstance(heads, bool) or not isinstance(heads, int) or heads <= 0:
        raise ValueError(f"num_attention_heads must be a positive integer, got {heads!r}")
    windows = _windows(config)
    if model_type == "ministral3":
        rope = _ministral3_rope(config)
    else:
        rope = {
            "rope_theta": _rope_theta(config),
            "max_position_embeddings": _context(config, windows),
        }
    return ModelArgs(
        dim=config["hidden_size"],
        n_layers=config["num_hidden_layers"],
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        hidden_dim=config["intermediate_size"],
        n_heads=heads,
        n_kv_heads=config["num_key_value_heads"],
        norm_eps=config["rms_norm_eps"],
        vocab_size=config["vocab_size"],
        sliding_window=windows,
        moe=moe,
        tied_embeddings=tied,
        **rope,
    )


def _ministral3_rope(config: dict) -> dict:
    """ModelArgs fields (rope_theta, yarn, llama_4_scaling, max_position_embeddings) from a
    Ministral3 config: the inverse of `rope_parameters`, read as transformers reads it."""
    spec = config.get("rope_parameters")
    if config.get("rope_scaling") is not None:  # 5.x reads it in place of rope_parameters
        if spec is not None:
            raise ValueError("both rope_scaling and rope_parameters are set")
        spec = config["rope_scaling"]
    if not isinstance(spec, dict):
        raise ValueError(
            f"ministral3 needs rope_parameters (an object), got {spec!r:.80} (transformers "
            "would put its own defaults in)"
        )
    kind = spec.get("rope_type", spec.get("type"))
    if "type" in spec and spec["type"] != kind:
        raise ValueError(f"rope_parameters: rope_type {kind!r} and type {spec['type']!r} differ")
    if kind not in _ROPE_KEYS:
        raise ValueError(
            f"rope_parameters rope_type {kind!r} is not supported (only yarn, or default with "
            "llama_4_scaling_beta)"
        )
    extra = sorted(set(spec) - _ROPE_KEYS[kind])
    if extra:
        raise ValueError(f"rope_parameters: unsupported key(s) for {kind}: {', '.join(extra)}")
    if spec.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(
            f"rope_parameters partial_rotary_factor {spec['partial_rotary_factor']!r} is not "
            "supported (only 1.0)"
        )
    if spec.get("truncate", True) is not True:  # params.json's yarn always truncates
        raise ValueError(f"rope_parameters truncate {spec['truncate']!r} is not supported")
    thetas = {config["rope_theta"]} if "rope_theta" in config else set()
    thetas |= {spec["rope_theta"]} if "rope_theta" in spec else set()
    if len(thetas) != 1:
        raise ValueError(f"rope_parameters: expected one rope_theta, found {sorted(thetas)}")
    beta = spec.get("llama_4_scaling_beta")
    if beta is None:
        raise ValueError(
            "rope_parameters has no llama_4_scaling_beta (transformers' Ministral3 needs it; 0 "
            "for no Llama-4 scaling)"
        )
    original = spec.get("original_max_position_embeddings")
    if original is None and (kind == "yarn" or beta):
        raise ValueError("rope_parameters has no original_max_position_embeddings")
    scaling = Llama4ScalingArgs(original, beta) if beta else None
    return {
        "rope_theta": thetas.pop(),
        "yarn": _yarn(spec, original, config) if kind == "yarn" else None,
        "llama_4_scaling": scaling,
        "max_position_embeddings": config.get("max_position_embeddings"),
    }


def _yarn(spec: dict, original, config: dict) -> YarnArgs:
    """params.json's yarn from transformers' yarn rope_parameters: beta_fast → beta, beta_slow
    → alpha (both defaulted as transformers does), and the attention factor transformers
    computes, which must be 1 (apply_scale false) or 0.1·ln(factor) + 1 (true)."""
    factor = spec.get("factor")
    if factor is None:  # transformers: the ratio of the two lengths
        factor = config["max_position_embeddings"] / original
    yarn = YarnArgs(
        factor=factor,
        original_max_position_embeddings=original,
        beta=spec.get("beta_fast") or 32.0,
        alpha=spec.get("beta_slow") or 1.0,
    )
    attention = spec.get("attention_factor")
    if attention is None:
        mscale, mscale_all_dim = spec.get("mscale"), spec.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention = _mscale(factor, mscale) / _mscale(factor, mscale_all_dim)
        else:
            attention = _mscale(factor, 1.0)
    if isinstance(attention, bool) or not isinstance(attention, int | float):
        raise ValueError(f"rope_parameters attention_factor must be a number, got {attention!r}")
    if math.isclose(attention, yarn.magnitude, rel_tol=1e-9):
        return yarn  # apply_scale: true
    if math.isclose(attention, 1.0, rel_tol=1e-9):
        return dataclasses.replace(yarn, apply_scale=False)
    raise ValueError(
        f"rope_parameters attention factor {attention!r} is neither 1 nor 0.1·ln(factor) + 1 "
        f"= {yarn.magnitude!r}: params.json's yarn (apply_scale) cannot express it"
    )


def _mscale(factor: float, mscale) -> float:
    """transformers' `get_mscale`."""
    if not isinstance(mscale, int | float) or isinstance(mscale, bool):
        raise ValueError(f"rope_parameters mscale must be a number, got {mscale!r}")
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


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
