"""`ModelArgs`: the fields of an official `params.json`, validated on construction.

Mirrors mistral-inference `args.py` (`TransformerArgs`, `MoeArgs`), with two deliberate
differences: `rope_theta` defaults to 10000 when absent (v0.1; mistral-inference's `or 1e6` is
wrong there) and unknown keys are refused instead of silently dropped.
"""

import dataclasses
import json
from pathlib import Path
from typing import Any

from checkpoint.errors import CheckpointError

# Keys some params.json files carry that describe the runtime, not the weights.
IGNORED_KEYS = frozenset({"max_batch_size", "max_seq_len"})


@dataclasses.dataclass(frozen=True)
class MoeArgs:
    """Mixtral's `moe` block: route each token to the top `num_experts_per_tok` experts."""

    num_experts: int
    num_experts_per_tok: int

    def __post_init__(self):
        _check_positive_ints(self, ("num_experts", "num_experts_per_tok"))
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError(
                f"moe.num_experts_per_tok ({self.num_experts_per_tok}) exceeds "
                f"moe.num_experts ({self.num_experts})"
            )


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
    sliding_window: int | None = None
    rope_theta: float = 10000.0
    moe: MoeArgs | None = None

    def __post_init__(self):
        if self.head_dim is None and isinstance(self.n_heads, int) and self.n_heads > 0:
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        _check_positive_ints(
            self,
            ("dim", "n_layers", "hidden_dim", "n_heads", "n_kv_heads", "vocab_size", "head_dim"),
        )
        if self.sliding_window is not None:
            _check_positive_ints(self, ("sliding_window",))
        for name in ("norm_eps", "rope_theta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) is not divisible by n_kv_heads ({self.n_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        if self.moe is not None and not isinstance(self.moe, MoeArgs):
            raise ValueError(f"moe must be MoeArgs, got {type(self.moe).__name__}")

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> "ModelArgs":
        """Build from a parsed params.json; unknown keys raise ValueError listing them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(params) - known - IGNORED_KEYS)
        if unknown:
            raise ValueError(f"unknown key(s) {', '.join(unknown)}")
        values = {k: v for k, v in params.items() if k in known}
        if values.get("rope_theta", 0) is None:
            values.pop("rope_theta")
        if values.get("moe") is not None:
            moe = values["moe"]
            if not isinstance(moe, dict):
                raise ValueError(f"moe must be an object, got {moe!r}")
            moe_known = {f.name for f in dataclasses.fields(MoeArgs)}
            extra = sorted(set(moe) - moe_known)
            missing = sorted(moe_known - set(moe))
            if extra or missing:
                raise ValueError(f"moe: unknown key(s) {extra}, missing key(s) {missing}")
            values["moe"] = MoeArgs(**moe)
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
        path = Path(path)
        try:
            params = json.loads(path.read_text())
        except FileNotFoundError:
            raise CheckpointError(path, "file not found") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(path, f"not valid JSON ({err})") from None
        if not isinstance(params, dict):
            raise CheckpointError(path, "expected a JSON object")
        try:
            return cls.from_dict(params)
        except (ValueError, TypeError) as err:
            raise CheckpointError(path, str(err)) from None

    def to_dict(self) -> dict[str, Any]:
        """The params.json form: None-valued optional keys are left out."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def _check_positive_ints(obj: object, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
