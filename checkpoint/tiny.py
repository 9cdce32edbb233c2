"""Seeded random checkpoints in the official format: the fixture for tests and the demo.

Weights are N(0, 1/fan_in) (embeddings N(0, 1), norms 1 + N(0, 0.1²)), so activations keep unit
scale through the blocks. The output head is scaled so logits have standard deviation
`logit_std`: random heads otherwise give near-flat distributions whose top-1 flips on bf16 noise.
"""

import importlib.resources
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from checkpoint.args import ModelArgs
from checkpoint.folder import PTH_NAME, SAFETENSORS_NAME
from checkpoint.spec import tensor_spec

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

# The tokenizers mistral-common ships, by vocabulary size.
_TOKENIZERS = {32000: "tokenizer.model.v1", 32768: "mistral_instruct_tokenizer_240323.model.v3"}


def bundled_tokenizer(vocab_size: int) -> Path:
    """Path of mistral-common's real Mistral tokenizer with this vocabulary size."""
    if vocab_size not in _TOKENIZERS:
        raise ValueError(f"no bundled tokenizer with vocab_size {vocab_size}; pass tokenizer=")
    try:
        data = importlib.resources.files("mistral_common") / "data" / _TOKENIZERS[vocab_size]
    except ModuleNotFoundError:
        raise ValueError("the real tokenizers come with `pip install mistral-common`") from None
    return Path(str(data))


def init_distribution(name: str, shape: tuple[int, ...], logit_std: float = 8.0):
    """(mean, std) of the random init of one checkpoint tensor."""
    if name.endswith("norm.weight"):
        return 1.0, 0.1
    if name == "tok_embeddings.weight":
        return 0.0, 1.0
    if name == "output.weight":
        return 0.0, logit_std / shape[1] ** 0.5
    return 0.0, 1.0 / shape[1] ** 0.5


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


def write_tiny_checkpoint(
    folder: str | Path,
    args: ModelArgs = TINY_ARGS,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    weights_format: str = "pth",
    tokenizer: str | Path | None = None,
    logit_std: float = 8.0,
) -> Path:
    """Write params.json, consolidated weights and tokenizer.model into `folder`.

    `tokenizer`: a sentencepiece model file; by default mistral-common's real one for
    vocab 32000/32768; for other vocabularies pass `tokenizer=False` to write none.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    args.to_json(folder / "params.json")
    state = {
        k: v.to(dtype) for k, v in random_state_dict(args, seed=seed, logit_std=logit_std).items()
    }
    if weights_format == "pth":
        torch.save(state, folder / PTH_NAME)
    elif weights_format == "safetensors":
        save_file(state, folder / SAFETENSORS_NAME)
    else:
        raise ValueError(f"weights_format must be 'pth' or 'safetensors', got {weights_format!r}")
    if tokenizer is not False:
        shutil.copyfile(tokenizer or bundled_tokenizer(args.vocab_size), folder / "tokenizer.model")
    return folder
