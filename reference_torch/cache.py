"""Rolling-buffer KV cache — mistral-inference `cache.py` (`BufferCache`), simplified to one
shared position counter for the batch.

Each layer holds `slots` keys/values; absolute position p lives in slot p % slots, so a sliding-
window model needs only W slots however long the sequence. `positions[s]` is the absolute position
held by slot s (-1: empty); attention masks by these positions, so the buffer never needs to be
un-rolled.
"""

import torch

from checkpoint.args import ModelArgs


class RollingKVCache:
    def __init__(
        self,
        args: ModelArgs,
        batch: int,
        capacity: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ):
        """`capacity` is the longest sequence to be cached; a window caps the slots at W."""
        self.slots = min(capacity, args.sliding_window) if args.sliding_window else capacity
        self.capacity = capacity
        shape = (args.n_layers, batch, self.slots, args.n_kv_heads, args.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.positions = torch.full((self.slots,), -1, dtype=torch.long, device=device)
        self.length = 0  # tokens seen so far

    def next_positions(self, n: int) -> torch.Tensor:
        if self.length + n > self.capacity:
            raise ValueError(f"cache capacity {self.capacity} exceeded ({self.length} + {n})")
        return torch.arange(self.length, self.length + n, device=self.positions.device)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.k[i], self.v[i], self.positions

    def write(self, i: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        """Store the last `slots` keys/values of a chunk (B, T, H, D) for layer i."""
        keep = slice(max(0, len(positions) - self.slots), None)
        slots = positions[keep] % self.slots
        self.k[i][:, slots] = k[:, keep]
        self.v[i][:, slots] = v[:, keep]

    def advance(self, positions: torch.Tensor) -> None:
        """Record that the chunk at `positions` is now cached (call after every layer wrote)."""
        keep = positions[max(0, len(positions) - self.slots) :]
        self.positions[keep % self.slots] = keep
        self.length += len(positions)
