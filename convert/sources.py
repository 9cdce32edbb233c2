"""What the converter reads: an official folder, or an HF transformers folder mapped back to
official names (wq/wk rows restored to interleaved-pair order on the fly; a head tied to the
embeddings is `tied_embeddings: true` in params.json, with no output.weight, as the official
tied releases have it)."""

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np

from checkpoint.args import ModelArgs
from checkpoint.errors import CheckpointError, read_json
from checkpoint.folder import (
    INDEX_NAME,
    in_spec_order,
    open_folder,
    raise_spec_problems,
    read_sharded_table,
)
from checkpoint.hf import args_from_hf_config
from checkpoint.hf_names import from_hf_names, halves_to_interleaved, rotary_heads
from checkpoint.safetensors_file import read_safetensors_table
from checkpoint.spec import Roles
from checkpoint.tensors import TensorRecord

Transform = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Source:
    path: Path
    layout: str  # "official" or "hf"
    args: ModelArgs
    tensors: dict[str, TensorRecord]  # official name → bytes, in spec order
    transforms: dict[str, Transform]  # official name → fix-up of the stored array (HF wq/wk)
    weights: tuple[Path, ...]
    roles: Roles


def is_hf_folder(folder: Path) -> bool:
    return (folder / "config.json").exists() and not (folder / "params.json").exists()


def open_source(folder: Path) -> Source:
    if not is_hf_folder(folder):
        checkpoint = open_folder(folder)
        return Source(
            folder,
            "official",
            checkpoint.args,
            checkpoint.tensors,
            {},
            checkpoint.weights,
            checkpoint.roles,
        )
    config_path = folder / "config.json"
    config = read_json(config_path)
    try:
        args = args_from_hf_config(config)
    except KeyError as err:
        raise CheckpointError(config_path, f"missing key {err}") from None
    except (TypeError, ValueError, ZeroDivisionError) as err:
        raise CheckpointError(config_path, str(err)) from None
    if (folder / INDEX_NAME).exists():
        stored, weights = read_sharded_table(folder / INDEX_NAME)
        blame = folder / INDEX_NAME
    else:
        blame = folder / "model.safetensors"
        stored, weights = read_safetensors_table(blame), (blame,)
    try:
        names = from_hf_names(stored)
    except ValueError as err:
        raise CheckpointError(blame, str(err)) from None
    tensors = {names[n]: record for n, record in stored.items()}
    if args.tied_embeddings and "output.weight" in tensors:
        raise CheckpointError(
            blame, "tie_word_embeddings is true but lm_head.weight is stored: ambiguous"
        )
    roles = raise_spec_problems(blame, {k: (r.shape, r.dtype) for k, r in tensors.items()}, args)
    transforms = {}
    for name in tensors:
        if heads := rotary_heads(name, args):
            transforms[name] = lambda w, h=heads: halves_to_interleaved(w, h)
    return Source(folder, "hf", args, in_spec_order(tensors, args), transforms, weights, roles)
