"""`ModelArgs`: the fields of an official `params.json`, validated on construction.

Mirrors mistral-inference `args.py` (`TransformerArgs`, `MoeArgs`) for text models, with two
deliberate differences: `rope_theta` defaults to 10000 when absent (v0.1; mistral-inference's
`or 1e6` is wrong there) and unknown keys are refused instead of silently dropped.

`sliding_window` is an int, or a list that repeats over the layers (`n_layers % len == 0`,
`null` = full attention for that layer; Ministral 8B interleaves windowed and full layers), or
null; `_sliding_window` is the same under the name vLLM reads (mistral-inference accepts one
of the two). `layer_windows` gives every layer's window, `window_pattern` the shortest unit
that repeats.
"""

import dataclasses
import json
from pathlib import Path
from typing import Any

from checkpoint.errors import CheckpointError, read_json
from checkpoint.sections import (
    MAX_SIZE,
    BlockFP8Args,
    Llama4ScalingArgs,
    MoeArgs,
    QuantizationArgs,
    YarnArgs,
    from_section,
    positive_number,
)

__all__ = ["MAX_SIZE", "ModelArgs", "MoeArgs", "cache_slots", "cached_shapes"]

# Keys some params.json files carry that describe the runtime, not the weights.
IGNORED_KEYS = frozenset({"max_batch_size"})
# Keys that change the model in ways these models do not implement.
_LARGE_4 = "Mistral Large 4's sparse-attention indexer, NoPE layers and KV sharing"
UNSUPPORTED_KEYS = {
    "lora": "LoRA adapters",
    "no_rope_layers": _LARGE_4,
    "kv_source_layers": _LARGE_4,
    "index_topk": _LARGE_4,
}
# The sections of a params.json, each a dataclass (checkpoint/sections.py).
SECTIONS = {
    "moe": MoeArgs,
    "yarn": YarnArgs,
    "llama_4_scaling": Llama4ScalingArgs,
    "quantization": QuantizationArgs,
    "quantization_config": BlockFP8Args,
}
# `multimodal` may hold a vision encoder (carried beside the text decoder); audio is refused.
MULTIMODAL_KEYS = {"vision_encoder_args": None, "whisper_model_args": "an audio encoder (Voxtral)"}


@dataclasses.dataclass(frozen=True)
class ModelArgs:
    """Hyperparameters of a Mistral model; field names are the params.json keys."""

    dim: int
    n_layers: int
    hidden_dim: int
    n_heads: int
    n_kv_heads: int
    norm_eps: float
    vocab_size: int
    head_dim: int | None = None  # None: dim // n_heads (filled in by __post_init__)
    # A list becomes a tuple of its shortest repeating unit, or the single value if uniform.
    sliding_window: int | tuple[int | None, ...] | None = None
    rope_theta: float = 10000.0
    moe: MoeArgs | None = None
    # 2025–26 releases (checkpoint/sections.py, docs/formats.md).
    max_position_embeddings: int | None = None  # positions past it are refused
    max_seq_len: int | None = None  # some releases carry both (reported, not used)
    yarn: YarnArgs | None = None
    llama_4_scaling: Llama4ScalingArgs | None = None
    tied_embeddings: bool = False  # the head is the embedding table (no output.weight)
    # FP8 linears (scales beside them): how the weights are stored, not what they compute,
    # so a dequantized copy describes the same model (compared as equal).
    quantization: QuantizationArgs | None = dataclasses.field(
        default=None, compare=False, hash=False
    )
    # Block FP8 (Large 3: compressed-tensors, `X.weight_scale` per 128×128 block): the same.
    quantization_config: BlockFP8Args | None = dataclasses.field(
        default=None, compare=False, hash=False
    )
    # A vision encoder beside the text decoder: carried, not modelled (compared as equal).
    vision_encoder: dict | None = dataclasses.field(default=None, compare=False, hash=False)
    multimodal: dict | None = dataclasses.field(default=None, compare=False, hash=False)
    # Multi-head latent attention (Mistral Small 4, Large 3): queries through a q_lora_rank
    # bottleneck, keys and values from a kv_lora_rank latent plus one shared rope key; each
    # head's query/key is [nope | rope] (head_dim = nope + rope), its value v_head_dim wide.
    q_lora_rank: int | None = None
    kv_lora_rank: int | None = None
    qk_nope_head_dim: int | None = None
    qk_rope_head_dim: int | None = None
    v_head_dim: int | None = None

    def __post_init__(self):
        if self.head_dim is None and self.latent:
            _check_positive_ints(self, ("qk_nope_head_dim", "qk_rope_head_dim"))
            object.__setattr__(self, "head_dim", self.qk_nope_head_dim + self.qk_rope_head_dim)
        if self.head_dim is None and isinstance(self.n_heads, int) and self.n_heads > 0:
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        _check_positive_ints(
            self,
            ("dim", "n_layers", "hidden_dim", "n_heads", "n_kv_heads", "vocab_size", "head_dim"),
        )
        if isinstance(self.sliding_window, list):
            object.__setattr__(self, "sliding_window", tuple(self.sliding_window))
        _check_windows(self.sliding_window, self.n_layers)
        if isinstance(self.sliding_window, tuple):  # canonical: the unit that repeats
            pattern = self.window_pattern
            object.__setattr__(self, "sliding_window", pattern if len(pattern) > 1 else pattern[0])
        for name in ("norm_eps", "rope_theta"):
            positive_number(self, name)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) is not divisible by n_kv_heads ({self.n_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        for name, section in SECTIONS.items():
            value = getattr(self, name)
            if value is not None and not isinstance(value, section):
                raise ValueError(f"{name} must be {section.__name__}, got {type(value).__name__}")
        if self.quantization is not None and self.quantization_config is not None:
            raise ValueError("both quantization and quantization_config are set")
        for name in ("max_position_embeddings", "max_seq_len"):
            if getattr(self, name) is not None:
                _check_positive_ints(self, (name,))
        if not isinstance(self.tied_embeddings, bool):
            raise ValueError(f"tied_embeddings must be true or false, got {self.tied_embeddings!r}")
        if self.vision_encoder is not None and not isinstance(self.vision_encoder, dict):
            raise ValueError("vision_encoder must be an object")
        if self.multimodal is not None:
            _check_multimodal(self.multimodal)
        _check_latent(self)

    @property
    def latent(self) -> bool:
        """Whether attention is multi-head latent attention (MLA)."""
        return self.kv_lora_rank is not None

    @property
    def fp8_block(self) -> tuple[int, int] | None:
        """The rows × columns each `weight_scale` covers (block FP8), else None."""
        return self.quantization_config.block if self.quantization_config else None

    @property
    def dense_layers(self) -> int:
        """How many layers, first, have a dense FFN before the MoE ones (fine-grained MoE)."""
        return self.moe.first_k_dense_replace if self.moe is not None else 0

    @property
    def has_vision(self) -> bool:
        """Whether the folder declares a vision encoder (its weights are carried)."""
        return self.vision_encoder is not None or bool(
            (self.multimodal or {}).get("vision_encoder_args")
        )

    def text_only(self) -> "ModelArgs":
        """The same text decoder without the vision encoder."""
        return dataclasses.replace(self, vision_encoder=None, multimodal=None)

    @property
    def layer_windows(self) -> tuple[int | None, ...]:
        """Every layer's window (None: full attention)."""
        if isinstance(self.sliding_window, tuple):
            return self.sliding_window * (self.n_layers // len(self.sliding_window))
        return (self.sliding_window,) * self.n_layers

    @property
    def window_pattern(self) -> tuple[int | None, ...]:
        """The shortest run of windows that repeats over the layers (one entry when uniform)."""
        windows = self.layer_windows
        period = next(
            p
            for p in range(1, len(windows) + 1)
            if len(windows) % p == 0 and windows == windows[:p] * (len(windows) // p)
        )
        return windows[:period]

    @property
    def layer_groups(self) -> tuple[tuple[int, ...], ...]:
        """The layers each step of the forward's scan runs: consecutive runs of one
        `window_pattern` period (one layer each when every layer has the same window)."""
        period = len(self.window_pattern)
        return tuple(tuple(range(g, g + period)) for g in range(0, self.n_layers, period))

    @property
    def shortest_window(self) -> int | None:
        """The smallest window of any layer (None: every layer attends over everything)."""
        return min((w for w in self.layer_windows if w is not None), default=None)

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> "ModelArgs":
        """Build from a parsed params.json; ValueError naming unknown or unsupported keys."""
        params = dict(params)
        for name, what in UNSUPPORTED_KEYS.items():
            if params.get(name) is not None:
                raise ValueError(f"key {name!r} is unsupported ({what})")
            params.pop(name, None)
        model_type = params.pop("model_type", "transformer")
        if model_type != "transformer":
            raise ValueError(f"model_type {model_type!r} is unsupported (only 'transformer')")
        if "_sliding_window" in params:
            alias = params.pop("_sliding_window")
            if params.get("sliding_window") is not None and alias is not None:
                raise ValueError("both sliding_window and _sliding_window are set")
            params["sliding_window"] = params.get("sliding_window") or alias
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(params) - known - IGNORED_KEYS)
        if unknown:
            raise ValueError(f"unknown key(s) {', '.join(unknown)}")
        values = {k: v for k, v in params.items() if k in known}
        if values.get("rope_theta", 0) is None:
            values.pop("rope_theta")
        for name, section in SECTIONS.items():
            if values.get(name) is not None:
                values[name] = from_section(section, values[name], name)
        missing = sorted(
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.name not in values
        )
        if missing:
            raise ValueError(f"missing key(s) {', '.join(missing)}")
        return cls(**values)

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelArgs":
        """Read and validate a params.json; any problem raises CheckpointError naming the file."""
        params = read_json(path)
        if not isinstance(params, dict):
            raise CheckpointError(path, "expected a JSON object")
        try:
            return cls.from_dict(params)
        except (ValueError, TypeError) as err:
            raise CheckpointError(path, str(err)) from None

    def to_dict(self) -> dict[str, Any]:
        """The params.json form: None-valued optional keys are left out, a window list stays
        a list."""
        values = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        if isinstance(self.sliding_window, tuple):
            values["sliding_window"] = list(self.sliding_window)
        return values

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


MLA_KEYS = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")


def _check_latent(args: ModelArgs) -> None:
    given = [k for k in MLA_KEYS if getattr(args, k) is not None]
    if not given:
        return
    if args.kv_lora_rank is None or args.q_lora_rank is None:
        raise ValueError(
            "latent attention needs q_lora_rank and kv_lora_rank (a null q_lora_rank, a plain "
            "attention.wq, appears in no release and is unsupported)"
        )
    _check_positive_ints(args, MLA_KEYS)
    if args.head_dim != args.qk_nope_head_dim + args.qk_rope_head_dim:
        raise ValueError(
            f"head_dim ({args.head_dim}) must be qk_nope_head_dim + qk_rope_head_dim "
            f"({args.qk_nope_head_dim} + {args.qk_rope_head_dim})"
        )
    if args.n_kv_heads != args.n_heads:
        raise ValueError("latent attention needs n_kv_heads = n_heads")
    if args.qk_rope_head_dim % 2:
        raise ValueError("qk_rope_head_dim must be even for rotary embeddings")
    if args.sliding_window is not None:
        raise ValueError("latent attention with a sliding window is unsupported")


def _check_multimodal(value) -> None:
    if not isinstance(value, dict):
        raise ValueError("multimodal must be an object")
    for key in value:
        if key not in MULTIMODAL_KEYS:
            raise ValueError(f"multimodal: unknown key {key!r}")
        if MULTIMODAL_KEYS[key] and value[key] is not None:
            raise ValueError(f"multimodal.{key} is unsupported ({MULTIMODAL_KEYS[key]})")


def _check_windows(window, n_layers: int) -> None:
    """An int > 0, None, or a non-empty list of those dividing n_layers."""

    def positive_int(w) -> bool:
        return isinstance(w, int) and not isinstance(w, bool) and 0 < w <= 2**31

    if window is None or positive_int(window):
        return
    if not isinstance(window, tuple) or not window:
        raise ValueError(
            f"sliding_window must be a positive integer, a list or null, got {window!r}"
        )
    if not all(w is None or positive_int(w) for w in window):
        raise ValueError(f"sliding_window entries must be positive ints or null, got {window!r}")
    if n_layers % len(window):
        raise ValueError(
            f"sliding_window has {len(window)} entries, which does not divide n_layers ({n_layers})"
        )


def cached_shapes(args: ModelArgs) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """What a KV cache keeps per token and layer: keys and values (kv heads × head_dim each), or,
    for latent attention, the kv latent and the shared rope key (576 values for Large 3 instead
    of 2 × 128 × 160 expanded)."""
    if args.latent:
        return (args.kv_lora_rank,), (args.qk_rope_head_dim,)
    return (args.n_kv_heads, args.head_dim), (args.n_kv_heads, args.head_dim)


def cache_slots(window: int | None, capacity: int) -> int:
    """KV-cache slots a layer with this window needs for sequences of up to `capacity` tokens
    (mistral-inference `get_cache_sizes`): W for a window of W keys, else the capacity."""
    return min(capacity, window) if window else capacity


def _check_positive_ints(obj: object, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if value > MAX_SIZE:
            raise ValueError(f"{name} {value} is beyond any model this toolkit can load")
