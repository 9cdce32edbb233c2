"""Checkpoint files split into shards (device sharding is `model_jax/sharding.py`), by HF's
conventions: decimal size limits, shards filled in key order, names
`model-0000i-of-0000N.safetensors` (transformers `modeling_utils.shard_checkpoint`)."""

import re

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(text: str | int) -> int:
    """'5GB' → 5_000_000_000 (decimal, as HF); '512MiB' → binary; plain ints are bytes."""
    if isinstance(text, int):
        size = text
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
        if not match or match[2].upper() not in _UNITS:
            raise ValueError(f"cannot parse size {text!r} (examples: 5GB, 500MB, 2GiB)")
        size = int(float(match[1]) * _UNITS[match[2].upper()])
    if size <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return size


def plan_shards(sizes: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Group names (in order) into shards of at most `max_shard_bytes` of tensor data.

    A tensor larger than the limit gets a shard of its own.
    """
    shards: list[list[str]] = []
    current: list[str] = []
    current_bytes = 0
    for name, nbytes in sizes.items():
        if current and current_bytes + nbytes > max_shard_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(name)
        current_bytes += nbytes
    if current:
        shards.append(current)
    return shards


def shard_name(index: int, count: int) -> str:
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"
