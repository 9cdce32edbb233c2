"""params.json of the published checkpoints (DESIGN.md §1), for specs, benchmarks and demos."""

import dataclasses

from checkpoint.args import ModelArgs, MoeArgs

_7B = dict(
    dim=4096, n_layers=32, head_dim=128, hidden_dim=14336, n_heads=32, n_kv_heads=8, norm_eps=1e-5
)

PRESETS: dict[str, ModelArgs] = {
    "7b-v0.1": ModelArgs(**_7B, vocab_size=32000, sliding_window=4096),
    "7b-v0.2": ModelArgs(**_7B, vocab_size=32000, rope_theta=1e6),
    "7b-v0.3": ModelArgs(**_7B, vocab_size=32768, rope_theta=1e6),
    "nemo-12b": ModelArgs(
        **(_7B | {"dim": 5120, "n_layers": 40}), vocab_size=131072, rope_theta=1e6
    ),
    "mixtral-8x7b": ModelArgs(
        **_7B, vocab_size=32000, rope_theta=1e6, moe=MoeArgs(num_experts=8, num_experts_per_tok=2)
    ),
}


def preset(name: str, *, n_layers: int | None = None) -> ModelArgs:
    """A published config, optionally cut to `n_layers` blocks (full-size shapes otherwise)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    args = PRESETS[name]
    return dataclasses.replace(args, n_layers=n_layers) if n_layers else args
