"""params.json of the published text releases (docs/formats.md), for specs, benchmarks and demos.

Values are those of each release's params.json in its Hugging Face repo (named per entry);
tests/test_spec.py checks each against the release's published parameter count.
"""

import dataclasses

from checkpoint.args import ModelArgs, MoeArgs
from checkpoint.sections import Llama4ScalingArgs, YarnArgs

_7B = dict(
    dim=4096, n_layers=32, head_dim=128, hidden_dim=14336, n_heads=32, n_kv_heads=8, norm_eps=1e-5
)
# Codestral 22B and Mistral Small 22B share this shape (and Mixtral 8x22B's, without experts).
_22B = dict(
    dim=6144, n_layers=56, head_dim=128, hidden_dim=16384, n_heads=48, n_kv_heads=8, norm_eps=1e-5
)
_NEMO = _7B | {"dim": 5120, "n_layers": 40}
# Mistral Small 3.x: the 24B trunk (also Magistral Small 1.x, Devstral Small 1.x and 2).
_SMALL3 = _NEMO | {"hidden_dim": 32768, "vocab_size": 131072}
# Ministral 3 (2512): YaRN ×16 over 16384 positions without the magnitude correction, Llama-4
# scaling over the same length, 262144 positions (their params.json, docs/formats.md).
_MINISTRAL3 = dict(
    head_dim=128,
    n_heads=32,
    n_kv_heads=8,
    norm_eps=1e-5,
    vocab_size=131072,
    rope_theta=1e6,
    max_position_embeddings=262144,
    yarn=YarnArgs(factor=16.0, original_max_position_embeddings=16384, apply_scale=False),
    llama_4_scaling=Llama4ScalingArgs(original_max_position_embeddings=16384, beta=0.1),
)

PRESETS: dict[str, ModelArgs] = {
    # mistralai/Mistral-7B-v0.1 (window 4096, no rope_theta: 10000)
    "7b-v0.1": ModelArgs(**_7B, vocab_size=32000, sliding_window=4096),
    # mistralai/Mistral-7B-Instruct-v0.2
    "7b-v0.2": ModelArgs(**_7B, vocab_size=32000, rope_theta=1e6),
    # mistralai/Mistral-7B-v0.3
    "7b-v0.3": ModelArgs(**_7B, vocab_size=32768, rope_theta=1e6),
    # mistralai/Mathstral-7B-v0.1
    "mathstral-7b": ModelArgs(**_7B, vocab_size=32768, rope_theta=1e6),
    # mistralai/Mixtral-8x7B-v0.1
    "mixtral-8x7b": ModelArgs(
        **_7B, vocab_size=32000, rope_theta=1e6, moe=MoeArgs(num_experts=8, num_experts_per_tok=2)
    ),
    # mistralai/Mixtral-8x22B-v0.1
    "mixtral-8x22b": ModelArgs(
        **_22B, vocab_size=32768, rope_theta=1e6, moe=MoeArgs(num_experts=8, num_experts_per_tok=2)
    ),
    # mistralai/Mistral-Nemo-Base-2407 (head_dim 128 ≠ dim / n_heads)
    "nemo-12b": ModelArgs(**_NEMO, vocab_size=131072, rope_theta=1e6),
    # mistralai/Codestral-22B-v0.1
    "codestral-22b": ModelArgs(**_22B, vocab_size=32768, rope_theta=1e6),
    # mistralai/Mistral-Small-Instruct-2409
    "small-22b": ModelArgs(**_22B, vocab_size=32768, rope_theta=1e6),
    # mistralai/Mistral-Small-24B-Base-2501
    "small-24b": ModelArgs(**(_NEMO | {"hidden_dim": 32768}), vocab_size=131072, rope_theta=1e8),
    # mistralai/Ministral-8B-Instruct-2410: a 128k window, then three 32k ones ("ragged")
    "ministral-8b": ModelArgs(
        **(_7B | {"n_layers": 36, "hidden_dim": 12288}),
        vocab_size=131072,
        rope_theta=1e8,
        sliding_window=(131072, 32768, 32768, 32768),
    ),
    # mistralai/Mistral-Small-3.1-24B-Instruct-2503 (text decoder; a vision encoder beside it);
    # Mistral Small 3.2, Magistral Small 2506–2509 and Devstral Small 2505/2507 share it.
    "small-3.1-24b": ModelArgs(**_SMALL3, rope_theta=1e9, max_position_embeddings=131072),
    # mistralai/Ministral-3-3B-Instruct-2512: the head tied to the embeddings
    "ministral-3-3b": ModelArgs(
        **_MINISTRAL3, dim=3072, n_layers=26, hidden_dim=9216, tied_embeddings=True
    ),
    # mistralai/Ministral-3-8B-Instruct-2512
    "ministral-3-8b": ModelArgs(**_MINISTRAL3, dim=4096, n_layers=34, hidden_dim=14336),
    # mistralai/Ministral-3-14B-Instruct-2512 (hidden_dim from the published 13.5B: 16384)
    "ministral-3-14b": ModelArgs(**_MINISTRAL3, dim=5120, n_layers=40, hidden_dim=16384),
    # mistralai/Mistral-Large-3-675B-Instruct-2512 (text decoder): latent attention, 128
    # experts top-4 + 1 shared, 3 dense layers first
    "large-3-675b": ModelArgs(
        dim=7168,
        n_layers=61,
        hidden_dim=16384,
        n_heads=128,
        n_kv_heads=128,
        norm_eps=1e-6,
        vocab_size=131072,
        rope_theta=10000.0,
        max_position_embeddings=294912,
        max_seq_len=262144,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        moe=MoeArgs(128, 4, num_shared_experts=1, expert_hidden_dim=4096, first_k_dense_replace=3),
        yarn=YarnArgs(factor=36.0, original_max_position_embeddings=8192, apply_scale=False),
        llama_4_scaling=Llama4ScalingArgs(original_max_position_embeddings=8192, beta=0.1),
    ),
    # mistralai/Mistral-Small-4-119B-2603 (text decoder): every layer routed
    "small-4-119b": ModelArgs(
        dim=4096,
        n_layers=36,
        hidden_dim=12288,
        n_heads=32,
        n_kv_heads=32,
        norm_eps=1e-6,
        vocab_size=131072,
        rope_theta=10000.0,
        max_position_embeddings=1048576,
        q_lora_rank=1024,
        kv_lora_rank=256,
        qk_nope_head_dim=64,
        qk_rope_head_dim=64,
        v_head_dim=128,
        moe=MoeArgs(128, 4, num_shared_experts=1, expert_hidden_dim=2048),
        yarn=YarnArgs(factor=128.0, original_max_position_embeddings=8192, apply_scale=False),
        llama_4_scaling=Llama4ScalingArgs(original_max_position_embeddings=8192, beta=0.1),
    ),
    # mistralai/Mistral-Large-Instruct-2407
    "large-2-123b": ModelArgs(
        dim=12288,
        n_layers=88,
        head_dim=128,
        hidden_dim=28672,
        n_heads=96,
        n_kv_heads=8,
        norm_eps=1e-5,
        vocab_size=32768,
        rope_theta=1e6,
    ),
}


def preset(name: str, *, n_layers: int | None = None) -> ModelArgs:
    """A published config, optionally cut to `n_layers` blocks (full-size shapes otherwise)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    args = PRESETS[name]
    return dataclasses.replace(args, n_layers=n_layers) if n_layers else args
