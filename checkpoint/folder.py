"""Open a checkpoint folder (official or converted) as `ModelArgs` + a validated tensor table.

Official: `params.json` + exactly one of `consolidated.00.pth`, `consolidated.safetensors`, or
`consolidated.safetensors.index.json` naming `consolidated-0000i-of-0000N.safetensors` (large
releases). Converted: `params.json` + `model.safetensors.index.json` + the shards it names.
Nothing here reads tensor data: records say where the bytes lie, `TensorRecord.array()` maps them.
"""

import dataclasses
from pathlib import Path

from checkpoint.args import ModelArgs
from checkpoint.errors import CheckpointError, read_json
from checkpoint.pth import read_pth_table
from checkpoint.safetensors_file import read_safetensors_table
from checkpoint.spec import Roles, classify, tensor_spec
from checkpoint.tensors import TensorRecord

PTH_NAME = "consolidated.00.pth"
SAFETENSORS_NAME = "consolidated.safetensors"
CONSOLIDATED_INDEX_NAME = "consolidated.safetensors.index.json"  # split official weights
INDEX_NAME = "model.safetensors.index.json"  # converted and HF folders
OFFICIAL_WEIGHTS = (PTH_NAME, SAFETENSORS_NAME, CONSOLIDATED_INDEX_NAME)


@dataclasses.dataclass(frozen=True)
class CheckpointFolder:
    path: Path
    args: ModelArgs
    tensors: dict[str, TensorRecord]  # the text decoder's in spec order, then the others
    weights: tuple[Path, ...]  # the weight files the tensors come from
    roles: Roles  # FP8 scales, carried vision tensors, unused scales


def weights_entry(folder: Path) -> Path:
    """The file the weights are found from: the one consolidated weights file (or its index)
    of an official folder, else a converted folder's index."""
    found = [folder / n for n in OFFICIAL_WEIGHTS if (folder / n).exists()]
    if not found and (folder / INDEX_NAME).exists():
        return folder / INDEX_NAME
    if len(found) != 1:
        which = ", ".join(p.name for p in found) or "none"
        raise CheckpointError(
            folder,
            f"expected exactly one of {', '.join(OFFICIAL_WEIGHTS)} (or a converted "
            f"{INDEX_NAME}), found {which}",
        )
    return found[0]


def open_folder(folder: str | Path) -> CheckpointFolder:
    """Read params.json and the tensor table, strict on keys and shapes."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(folder, "not a directory")
    args = ModelArgs.from_json(folder / "params.json")
    blame = weights_entry(folder)
    if blame.name.endswith(".index.json"):
        tensors, weights = read_sharded_table(blame)
    else:
        reader = read_pth_table if blame.suffix == ".pth" else read_safetensors_table
        tensors, weights = reader(blame), (blame,)
    roles = raise_spec_problems(blame, {k: (r.shape, r.dtype) for k, r in tensors.items()}, args)
    return CheckpointFolder(folder, args, in_spec_order(tensors, args), weights, roles)


def in_spec_order(tensors: dict, args: ModelArgs) -> dict:
    """The text decoder's tensors in spec order, then the others in file order."""
    text = tensor_spec(args)
    return {k: tensors[k] for k in text} | {k: v for k, v in tensors.items() if k not in text}


def raise_spec_problems(
    path: Path, found: dict[str, tuple[tuple[int, ...], str]], args: ModelArgs
) -> Roles:
    """The tensors' roles (`checkpoint.spec.classify`); CheckpointError naming the first
    problem (and how many more) if they miss the spec."""
    roles, problems = classify(found, args)
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise CheckpointError(path, problems[0] + more)
    return roles


def read_weight_map(index_path: Path) -> dict[str, str]:
    """The `weight_map` of an index (tensor → shard file beside it); CheckpointError naming the
    index when it is malformed or names a file outside its folder."""
    index = read_json(index_path, max_bytes=64 * 2**20)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(index_path, "no weight_map object in the index")
    for shard in weight_map.values():
        if not (isinstance(shard, str) and shard.endswith(".safetensors") and "/" not in shard):
            raise CheckpointError(index_path, f"{shard!r:.80} is not a shard file beside it")
    return weight_map


def read_sharded_table(index_path: Path) -> tuple[dict[str, TensorRecord], tuple[Path, ...]]:
    """Records of every tensor named by a HF-style index; each must sit in its named shard."""
    weight_map = read_weight_map(index_path)
    shards = tuple(index_path.parent / s for s in dict.fromkeys(weight_map.values()))
    tensors: dict[str, TensorRecord] = {}
    for shard in shards:
        for name, record in read_safetensors_table(shard).items():
            if weight_map.get(name) != shard.name:
                raise CheckpointError(shard, f"tensor {name} is not mapped to this shard")
            tensors[name] = record
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        raise CheckpointError(index_path, f"tensor {missing[0]} is not in its shard")
    return tensors, shards
