"""Seeded random checkpoints in the official format: the fixture for tests and the demo.

Weights are N(0, 1/fan_in) (embeddings N(0, 1), norms 1 + N(0, 0.1²)), so activations keep unit
scale through the blocks. The output head is scaled so logits have standard deviation
`logit_std`: random heads otherwise give near-flat distributions whose top-1 flips on bf16 noise.
"""

import importlib.resources
import json
import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from checkpoint.args import ModelArgs
from checkpoint.folder import CONSOLIDATED_INDEX_NAME, PTH_NAME, SAFETENSORS_NAME
from checkpoint.spec import block_grid, tensor_spec

# The embedded default: small enough to run everywhere in seconds, with the real v0.1 vocabulary,
# a window shorter than the demo prompts, GQA and head_dim != dim / n_heads.
TINY_ARGS = ModelArgs(
    dim=64,
    n_layers=4,
    head_dim=32,
    hidden_dim=160,
    n_heads=4,
    n_kv_heads=2,
    norm_eps=1e-5,
    vocab_size=32000,
    sliding_window=32,
    rope_theta=10000.0,
)

# The tokenizers mistral-common ships, by vocabulary size, and the name each release folder
# gives it (v0.1/v0.2: tokenizer.model; v0.3 and later sentencepiece: tokenizer.model.v3;
# Nemo and later: tekken.json).
_TOKENIZERS = {
    32000: ("tokenizer.model.v1", "tokenizer.model"),
    32768: ("mistral_instruct_tokenizer_240323.model.v3", "tokenizer.model.v3"),
    131072: ("tekken_240718.json", "tekken.json"),
}


def bundled_tokenizer(vocab_size: int) -> Path:
    """Path of mistral-common's real Mistral tokenizer with this vocabulary size."""
    if vocab_size not in _TOKENIZERS:
        raise ValueError(
            f"no real Mistral tokenizer has vocab_size {vocab_size} "
            f"(bundled: {', '.join(map(str, _TOKENIZERS))}); pass tokenizer="
        )
    data = importlib.resources.files("mistral_common") / "data" / _TOKENIZERS[vocab_size][0]
    return Path(str(data))


def copy_tokenizer(folder: Path, vocab_size: int, tokenizer: str | Path | None = None) -> None:
    """Put a tokenizer into `folder` under the name its release uses."""
    if tokenizer is None:
        source, name = bundled_tokenizer(vocab_size), _TOKENIZERS[vocab_size][1]
    else:
        source = Path(tokenizer)
        name = source.name
    shutil.copyfile(source, folder / name)


def init_distribution(name: str, shape: tuple[int, ...], logit_std: float = 8.0):
    """(mean, std) of the random init of one checkpoint tensor."""
    if name.endswith("norm.weight"):
        return 1.0, 0.1
    if name == "tok_embeddings.weight":
        return 0.0, 1.0
    if name == "output.weight":
        return 0.0, logit_std / shape[1] ** 0.5
    return 0.0, 1.0 / shape[1] ** 0.5


MAX_TINY_PARAMETERS = 500_000_000  # fp32 random weights in memory: 2 GB


def check_tiny_size(args: ModelArgs) -> None:
    """ValueError, before anything is allocated, for a config too large to build in memory."""
    total = sum(math.prod(s) for s in tensor_spec(args).values())
    if total > MAX_TINY_PARAMETERS:
        raise ValueError(
            f"{total:,} parameters: tiny checkpoints are built in memory, up to "
            f"{MAX_TINY_PARAMETERS:,}; for full-size shapes use --preset"
        )


def random_state_dict(
    args: ModelArgs, *, seed: int = 0, logit_std: float = 8.0
) -> dict[str, torch.Tensor]:
    """fp32 random weights for every tensor of the spec (deterministic per seed)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in tensor_spec(args).items():
        mean, std = init_distribution(name, shape, logit_std)
        state[name] = torch.randn(shape, generator=gen) * std + mean
    return state


FP8_MAX = 448.0  # the largest finite float8_e4m3fn


def quantize_fp8(
    state: dict[str, torch.Tensor], names, *, per_row: bool = False, scalar: bool = False
) -> dict[str, torch.Tensor]:
    """`state` with the weights `names` stored as the mistral format's FP8: X.weight in
    float8_e4m3fn, X.qscale_weight (per tensor: shape [1], or 0-d with `scalar`, or one per
    output row with `per_row`) and X.qscale_act (a static activation scale, unused here)."""
    out = dict(state)
    for name in names:
        weight = state[name].float()
        base = name.removesuffix(".weight")
        if per_row:
            scale = weight.abs().amax(dim=1).clamp(min=1e-12) / FP8_MAX
            quantized = weight / scale[:, None]
        else:
            scale = (weight.abs().max().clamp(min=1e-12) / FP8_MAX).reshape(() if scalar else 1)
            quantized = weight / scale
        out[name] = quantized.to(torch.float8_e4m3fn)
        out[f"{base}.qscale_weight"] = scale.to(torch.float32)
        out[f"{base}.qscale_act"] = torch.tensor(0.05 if scalar else [0.05])
    return out


def quantize_fp8_blocks(
    state: dict[str, torch.Tensor], names, block: tuple[int, int], *, scale_dtype=torch.float32
) -> dict[str, torch.Tensor]:
    """`state` with the weights `names` stored as compressed-tensors block FP8 (Large 3's
    `quantization_config`): X.weight in float8_e4m3fn, X.weight_scale one scale per `block`
    (rows × columns) of it, the last blocks partial; weight = fp8 × its block's scale."""
    out = dict(state)
    for name in names:
        weight = state[name].float()
        (rows, cols), (row_block, col_block) = weight.shape, block
        grid = block_grid(weight.shape, block)
        padded = torch.zeros(grid[0] * row_block, grid[1] * col_block)
        padded[:rows, :cols] = weight.abs()
        amax = padded.reshape(grid[0], row_block, grid[1], col_block).amax(dim=(1, 3))
        scale = (amax.clamp(min=1e-12) / FP8_MAX).to(scale_dtype)
        expanded = scale.float().repeat_interleave(row_block, 0)[:rows]
        expanded = expanded.repeat_interleave(col_block, 1)[:, :cols]
        out[name] = (weight / expanded).to(torch.float8_e4m3fn)
        out[f"{name.removesuffix('.weight')}.weight_scale"] = scale
    return out


def block_fp8_config(block: tuple[int, int]) -> dict:
    """A params.json `quantization_config` as Large 3 ships it: compressed-tensors, FP8
    weights in `block`s, activations quantized dynamically (nothing stored)."""
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {
                    "num_bits": 8,
                    "type": "float",
                    "strategy": "block",
                    "block_structure": list(block),
                    "symmetric": True,
                    "dynamic": False,
                },
                "input_activations": {
                    "num_bits": 8,
                    "type": "float",
                    "strategy": "group",
                    "group_size": block[1],
                    "symmetric": True,
                    "dynamic": True,
                },
            }
        },
        "ignore": ["model.embed_tokens", "re:.*kv_a_proj_with_mqa$", "re:.*q_a_proj$", "lm_head"],
    }


# A tiny vision encoder's params.json section and tensors, under the real prefixes: what a
# multimodal folder keeps beside the text decoder (carried, never modelled).
TINY_VISION_ENCODER = {
    "hidden_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "patch_size": 2,
    "image_size": 8,
    "num_channels": 3,
    "rope_theta": 10000.0,
    "image_token_id": 10,
}


def vision_state(args: ModelArgs, *, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed + 31)
    shapes = {
        "vision_encoder.patch_conv.weight": (16, 3, 2, 2),
        "vision_encoder.ln_pre.weight": (16,),
        "vision_encoder.transformer.layers.0.attention.wq.weight": (16, 16),
        "vision_encoder.transformer.layers.0.feed_forward.w1.weight": (32, 16),
        "pre_mm_projector_norm.weight": (16,),
        "patch_merger.merging_layer.weight": (16, 64),
        "vision_language_adapter.w_in.weight": (args.dim, 16),
        "vision_language_adapter.w_out.weight": (args.dim, args.dim),
    }
    return {name: torch.randn(shape, generator=gen) for name, shape in shapes.items()}


WEIGHTS_FORMATS = ("pth", "safetensors", "split-safetensors")


def write_split_safetensors(folder: Path, state: dict[str, torch.Tensor], shards: int) -> None:
    """Large releases' layout: consolidated-0000i-of-0000N.safetensors (tensors in order) and
    consolidated.safetensors.index.json mapping each tensor to its file."""
    names = list(state)
    per = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        file = f"consolidated-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: state[n].contiguous() for n in names[i * per : (i + 1) * per]}
        save_file(part, folder / file)
        weight_map |= dict.fromkeys(part, file)
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / CONSOLIDATED_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def write_tiny_checkpoint(
    folder: str | Path,
    args: ModelArgs = TINY_ARGS,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    weights_format: str = "pth",
    tokenizer: str | Path | None = None,
    logit_std: float = 8.0,
    state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write params.json, consolidated weights and a tokenizer into `folder`.

    `state`: the weights to write (default `random_state_dict(args, seed, logit_std)`), cast
    to `dtype`. `tokenizer`: a tokenizer file (copied under its own name); by default
    mistral-common's real one for vocab 32000/32768/131072; `tokenizer=False` writes none.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    args.to_json(folder / "params.json")
    if state is None:
        state = random_state_dict(args, seed=seed, logit_std=logit_std)
    # Floating tensors in `dtype`; FP8 weights and their float32 scales stay as they are.
    state = {k: v if _keeps_dtype(k, v) else v.to(dtype) for k, v in state.items()}
    if weights_format == "pth":
        torch.save(state, folder / PTH_NAME)
    elif weights_format == "safetensors":
        save_file(state, folder / SAFETENSORS_NAME)
    elif weights_format == "split-safetensors":
        write_split_safetensors(folder, state, shards=2)
    else:
        raise ValueError(
            f"weights_format must be one of {', '.join(WEIGHTS_FORMATS)}, got {weights_format!r}"
        )
    if tokenizer is not False:
        copy_tokenizer(folder, args.vocab_size, tokenizer)
    return folder


def _keeps_dtype(name: str, tensor: torch.Tensor) -> bool:
    return tensor.dtype == torch.float8_e4m3fn or name.endswith(
        ("qscale_weight", "qscale_act", "weight_scale")
    )
