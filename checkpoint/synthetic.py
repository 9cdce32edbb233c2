"""Full-size random checkpoints (e.g. 7B-shaped) written tensor by tensor, in bounded memory.

`torch.save` under `torch.serialization.skip_data()` writes the official zip layout with the
storage bytes left as holes; each tensor's byte range (found by the restricted reader) is then
filled from a reused block of N(0, 1/fan_in) bf16 values. Memory stays at one 64 MB block
whatever the model size. The values repeat across tensors: fine for speed and memory
measurements and for parity runs, not a substitute for real weights.
"""

from pathlib import Path

import ml_dtypes
import numpy as np
import torch
from torch.serialization import skip_data

from checkpoint.args import ModelArgs
from checkpoint.folder import PTH_NAME
from checkpoint.pth import read_pth_table
from checkpoint.spec import tensor_spec
from checkpoint.tiny import copy_tokenizer, init_distribution

BLOCK_ELEMENTS = 32 * 2**20


def write_synthetic_checkpoint(
    folder: str | Path, args: ModelArgs, *, seed: int = 0, tokenizer: str | Path | None = None
) -> Path:
    """Write params.json, a bf16 consolidated.00.pth and a tokenizer into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    args.to_json(folder / "params.json")
    spec = tensor_spec(args)
    with skip_data():
        torch.save(
            {k: torch.empty(s, dtype=torch.bfloat16) for k, s in spec.items()}, folder / PTH_NAME
        )
    rng = np.random.default_rng(seed)
    blocks: dict[tuple[float, float], np.ndarray] = {}
    with open(folder / PTH_NAME, "r+b") as f:
        for name, record in read_pth_table(folder / PTH_NAME).items():
            mean, std = init_distribution(name, spec[name])
            if (mean, std) not in blocks:
                values = rng.standard_normal(BLOCK_ELEMENTS, dtype=np.float32) * std + mean
                blocks[(mean, std)] = values.astype(ml_dtypes.bfloat16).view(np.uint8)
            block = blocks[(mean, std)]
            start = int(rng.integers(0, BLOCK_ELEMENTS)) * 2
            f.seek(record.offset)
            remaining = record.nbytes
            while remaining:
                piece = block[start : start + remaining]
                f.write(piece.data)
                remaining -= len(piece)
                start = 0
    copy_tokenizer(folder, args.vocab_size, tokenizer)
    return folder
