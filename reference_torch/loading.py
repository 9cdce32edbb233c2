"""Load weights into the reference on the meta device, then assign — mistral-inference
`Transformer.from_folder`. Uses torch's own readers (`torch.load(weights_only=True)`,
`safetensors.torch`), independent of the JAX side's reader, so a reader bug shows up as a
parity failure instead of being shared by both models."""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from checkpoint.args import ModelArgs
from checkpoint.errors import CheckpointError
from checkpoint.folder import INDEX_NAME, official_weights_file, raise_spec_problems


def read_state_dict(folder: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """Every tensor of an official or converted folder (mmap'd where possible)."""
    index = folder / INDEX_NAME
    if index.exists():
        shards = dict.fromkeys(json.loads(index.read_text())["weight_map"].values())
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state |= load_file(folder / shard)
        return state, index
    path = official_weights_file(folder)
    if path.suffix == ".safetensors":
        return load_file(path), path
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch raises many types for unsafe or corrupt pickles
        raise CheckpointError(path, f"cannot load safely ({str(err).splitlines()[0]})") from None
    if not isinstance(state, dict):
        raise CheckpointError(path, "does not hold a dict of tensors")
    return state, path


def load_transformer(cls, folder, *, dtype: torch.dtype, device: str | torch.device):
    folder = Path(folder)
    args = ModelArgs.from_json(folder / "params.json")
    state, source = read_state_dict(folder)
    raise_spec_problems(source, {k: tuple(v.shape) for k, v in state.items()}, args)
    with torch.device("meta"):
        model = cls(args)
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)
