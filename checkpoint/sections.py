"""The nested sections of a params.json (`moe`, `yarn`, `llama_4_scaling`, `quantization`),
each a frozen dataclass whose fields are the section's keys, validated on construction.

Keys a section does not declare are refused by name; keys that are deployment hints (how to
spread experts over devices) are listed in the section's `HINTS` and accepted with no effect.
Sources for the meanings: mistral-inference `args.py` (moe), HF transformers
`ministral3`/`mistral4` and vLLM's mistral-format loader (`configs/mistral.py`) for the
2025–26 keys (`docs/formats.md`).
"""

import dataclasses
import math
from typing import Any, ClassVar


def positive_int(obj: object, name: str, *, zero: bool = False) -> None:
    value = getattr(obj, name)
    low = 0 if zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(
            f"{name} must be a {'non-negative' if zero else 'positive'} integer, got {value!r}"
        )
    if value > MAX_SIZE:
        raise ValueError(f"{name} {value} is beyond any model this toolkit can load")


def positive_number(obj: object, name: str) -> None:
    value = getattr(obj, name)
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{name} must be a finite positive number, got {value!r}")


# Far above every release (Large 2: dim 12288, 88 layers; contexts of 1M positions), far below
# what would overflow or exhaust memory in arithmetic on them.
MAX_SIZE = 2**22


def from_section(cls, value: Any, section: str):
    """`cls` built from a params.json section; ValueError naming unknown or missing keys."""
    if not isinstance(value, dict):
        raise ValueError(f"{section} must be an object, got {value!r:.60}")
    hints = getattr(cls, "HINTS", frozenset())
    known = {f.name for f in dataclasses.fields(cls)}
    extra = sorted(set(value) - known - hints)
    if extra:
        raise ValueError(f"{section}: unknown key(s) {', '.join(extra)}")
    missing = sorted(
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.name not in value
    )
    if missing:
        raise ValueError(f"{section}: missing key(s) {', '.join(missing)}")
    try:
        return cls(**{k: v for k, v in value.items() if k in known})
    except ValueError as err:
        raise ValueError(f"{section}: {err}") from None


@dataclasses.dataclass(frozen=True)
class MoeArgs:
    """The `moe` block.

    Mixtral (`num_experts`, `num_experts_per_tok` only): route each token to the top k experts
    by gate logit, softmax over those k. Fine-grained (Mistral Small 4, Large 3: the other keys
    given): a softmax over all routed experts, the top `num_expert_groups_per_tok` groups by
    the sum of each group's two best scores, the top k experts within them, their scores
    renormalised to sum to 1 and × `routed_scale`; plus `num_shared_experts` always-on experts
    of width `expert_hidden_dim` each, and dense FFNs in the first `first_k_dense_replace`
    layers. `expert_parallel` / `expert_model_parallel` are deployment hints (no effect).
    """

    num_experts: int
    num_experts_per_tok: int
    num_shared_experts: int | None = None  # None: Mixtral; set: fine-grained routing
    expert_hidden_dim: int | None = None  # None: the model's hidden_dim (Mixtral)
    first_k_dense_replace: int = 0
    route_every_n: int = 1
    routed_scale: float = 1.0
    num_expert_groups: int = 1
    num_expert_groups_per_tok: int = 1
    HINTS: ClassVar[frozenset[str]] = frozenset({"expert_parallel", "expert_model_parallel"})

    def __post_init__(self):
        positive_int(self, "num_experts")
        positive_int(self, "num_experts_per_tok")
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds "
                f"num_experts ({self.num_experts})"
            )
        if self.num_shared_experts is None:
            defaults = {f.name: f.default for f in dataclasses.fields(self)}
            for name in ("first_k_dense_replace", "routed_scale", "num_expert_groups"):
                if getattr(self, name) != defaults[name]:
                    raise ValueError(f"{name} needs num_shared_experts (fine-grained routing)")
            return
        positive_int(self, "num_shared_experts", zero=True)
        if self.expert_hidden_dim is None:
            raise ValueError("fine-grained routing needs expert_hidden_dim")
        positive_int(self, "expert_hidden_dim")
        positive_int(self, "first_k_dense_replace", zero=True)
        if self.route_every_n != 1:
            raise ValueError(
                f"route_every_n {self.route_every_n} is unsupported (only 1: every layer after "
                "the dense ones routes)"
            )
        positive_number(self, "routed_scale")
        positive_int(self, "num_expert_groups")
        positive_int(self, "num_expert_groups_per_tok")
        groups, chosen = self.num_expert_groups, self.num_expert_groups_per_tok
        if self.num_experts % groups or chosen > groups:
            raise ValueError(
                f"num_expert_groups ({groups}) must divide num_experts ({self.num_experts}) "
                f"and be at least num_expert_groups_per_tok ({chosen})"
            )
        if self.num_experts_per_tok > chosen * self.num_experts // groups:
            raise ValueError("num_experts_per_tok exceeds the experts of the chosen groups")

    @property
    def fine_grained(self) -> bool:
        return self.num_shared_experts is not None


@dataclasses.dataclass(frozen=True)
class YarnArgs:
    """YaRN context extension (`yarn`): NTK-by-parts frequencies between the fast and slow
    rotation bounds `beta` and `alpha` (vLLM: beta_fast, beta_slow) over the original length,
    and the attention factor 0.1·ln(factor) + 1 on cos/sin unless `apply_scale` is false
    (absent: true, vLLM's reading)."""

    factor: float
    original_max_position_embeddings: int
    beta: float = 32.0
    alpha: float = 1.0
    apply_scale: bool = True

    def __post_init__(self):
        positive_number(self, "factor")
        positive_int(self, "original_max_position_embeddings")
        positive_number(self, "beta")
        positive_number(self, "alpha")
        if not isinstance(self.apply_scale, bool):
            raise ValueError(f"apply_scale must be true or false, got {self.apply_scale!r}")
        if self.alpha >= self.beta:
            raise ValueError(f"alpha ({self.alpha}) must be below beta ({self.beta})")

    @property
    def magnitude(self) -> float:
        """YaRN's magnitude correction 0.1·ln(factor) + 1 (1 for factor ≤ 1)."""
        return 1.0 if self.factor <= 1 else 0.1 * math.log(self.factor) + 1.0

    @property
    def attention_factor(self) -> float:
        """What cos and sin are multiplied by: the magnitude correction if `apply_scale`."""
        return self.magnitude if self.apply_scale else 1.0


@dataclasses.dataclass(frozen=True)
class Llama4ScalingArgs:
    """Llama-4 attention (query temperature) scaling: q × (1 + β·ln(1 + ⌊pos / original⌋))."""

    original_max_position_embeddings: int
    beta: float

    def __post_init__(self):
        positive_int(self, "original_max_position_embeddings")
        if (
            isinstance(self.beta, bool)
            or not isinstance(self.beta, int | float)
            or not math.isfinite(self.beta)
            or self.beta < 0
        ):
            raise ValueError(f"beta must be a finite number ≥ 0, got {self.beta!r}")


@dataclasses.dataclass(frozen=True)
class QuantizationArgs:
    """Mistral-format FP8 (`quantization`): quantized linears store `X.weight` as
    float8_e4m3fn with `X.qscale_weight` (weight = fp8 × scale) and `X.qscale_act`, a static
    activation scale (TENSOR) or none (NO_SCALES)."""

    qformat_weight: str
    qscheme_act: str = "TENSOR"
    FORMATS: ClassVar[tuple[str, ...]] = ("fp8_e4m3",)
    SCHEMES: ClassVar[tuple[str, ...]] = ("TENSOR", "NO_SCALES")

    def __post_init__(self):
        if self.qformat_weight not in self.FORMATS:
            raise ValueError(
                f"qformat_weight {self.qformat_weight!r} is unsupported (only fp8_e4m3)"
            )
        if self.qscheme_act not in self.SCHEMES:
            raise ValueError(
                f"qscheme_act {self.qscheme_act!r} is unsupported (TENSOR or NO_SCALES)"
            )


@dataclasses.dataclass(frozen=True)
class BlockFP8Args:
    """Block FP8 in compressed-tensors form (`quantization_config`, Mistral Large 3): quantized
    linears store `X.weight` as float8_e4m3fn with `X.weight_scale` beside it, one scale per
    `block` of the weight (rows × columns, 128×128 in the release): weight = fp8 × the scale
    of its block. Which linears are quantized is read from the tensors (`ignore` lists them in
    HF's or vLLM's names, kept as given). Activations quantized dynamically (FP8 per group at
    run time, nothing stored) describe the serving kernel, not the weights: both models here
    run activations in the compute dtype, as they do for the per-tensor `quantization`.

    Refused by name: another method or format, weights other than 8-bit float in blocks,
    asymmetric weights, static activation scales, an FP8 KV cache, sparsity or transforms."""

    quant_method: str
    config_groups: dict
    format: str = "float-quantized"
    ignore: list | None = None
    quantization_status: str | None = None
    kv_cache_scheme: dict | None = None
    sparsity_config: dict | None = None
    transform_config: dict | None = None
    global_compression_ratio: float | None = None
    version: str | None = None

    def __post_init__(self):
        if self.quant_method != "compressed-tensors":
            raise ValueError(f"quant_method {self.quant_method!r} is unsupported")
        if self.format != "float-quantized":
            raise ValueError(f"format {self.format!r} is unsupported (only float-quantized)")
        for name in ("kv_cache_scheme", "sparsity_config", "transform_config"):
            if getattr(self, name):
                raise ValueError(f"{name} is unsupported")
        if not isinstance(self.config_groups, dict) or not self.config_groups:
            raise ValueError("config_groups must be a non-empty object")
        blocks = {_group_block(name, g) for name, g in self.config_groups.items()}
        if len(blocks) > 1:
            raise ValueError(f"config_groups use different blocks {sorted(blocks)}")

    @property
    def block(self) -> tuple[int, int]:
        """The rows × columns of the weight each scale covers."""
        return next(_group_block(n, g) for n, g in self.config_groups.items())


def _group_block(name: str, group) -> tuple[int, int]:
    """The block of one config group's weights; ValueError naming what it cannot implement."""
    if not isinstance(group, dict) or not isinstance(group.get("weights"), dict):
        raise ValueError(f"config_groups.{name} must hold a weights object")
    weights = group["weights"]
    wanted = {"num_bits": 8, "type": "float", "strategy": "block", "dynamic": False}
    for key, value in wanted.items():
        given = weights.get(key, False) if key == "dynamic" else weights.get(key)
        if given != value:
            raise ValueError(
                f"config_groups.{name}.weights.{key} {given!r} is unsupported "
                f"(block FP8 needs {value!r})"
            )
    if weights.get("symmetric", True) is not True:
        raise ValueError(f"config_groups.{name}: asymmetric weights are unsupported")
    block = weights.get("block_structure")
    if (
        not isinstance(block, list)
        or len(block) != 2
        or not all(
            isinstance(b, int) and not isinstance(b, bool) and 0 < b <= MAX_SIZE for b in block
        )
    ):
        raise ValueError(
            f"config_groups.{name}.weights.block_structure must be [rows, columns], got {block!r}"
        )
    activations = group.get("input_activations")
    if activations is not None and (
        not isinstance(activations, dict) or activations.get("dynamic") is not True
    ):
        raise ValueError(
            f"config_groups.{name}: static input activation scales are unsupported "
            "(only dynamic ones, which store nothing)"
        )
    if group.get("output_activations") is not None:
        raise ValueError(f"config_groups.{name}: output activation quantization is unsupported")
    return tuple(block)
