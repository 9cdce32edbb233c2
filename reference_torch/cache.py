"""Rolling-buffer KV cache — mistral-inference `cache.py` (`BufferCache`), simplified to one
shared position counter for the batch.

Each layer holds its own number of slots, as `get_cache_sizes` gives them: W for a layer with
a window of W keys, the whole capacity for a full-attention layer. Absolute position p lives in
slot p % slots, so a windowed layer needs only W slots however long the sequence.
`positions[i][s]` is the absolute position layer i's slot s holds (-1: empty); attention masks
by these positions, so the buffer never needs to be un-rolled.
"""

import torch

from checkpoint.args import ModelArgs, cache_slots, cached_shapes


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
        """`capacity` is the longest sequence to be cached."""
        self.capacity = capacity
        self.k, self.v, self.positions = [], [], []
        first, second = cached_shapes(args)  # keys and values, or the latent and rope key
        for window in args.layer_windows:
            slots = cache_slots(window, capacity)
            self.k.append(torch.zeros((batch, slots, *first), dtype=dtype, device=device))
            self.v.append(torch.zeros((batch, slots, *second), dtype=dtype, device=device))
            self.positions.append(torch.full((slots,), -1, dtype=torch.long, device=device))
        self.length = 0  # tokens seen so far

    def next_positions(self, n: int) -> torch.Tensor:
        if self.length + n > self.capacity:
            raise ValueError(f"cache capacity {self.capacity} exceeded ({self.length} + {n})")
        return torch.arange(self.length, self.length + n, device=self.positions[0].device)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.k[i], self.v[i], self.positions[i]

    def write(self, i: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        """Store the last `slots` keys/values of a chunk (B, T, H, D) for layer i."""
        slots_i = self.k[i].shape[1]
        keep = slice(max(0, len(positions) - slots_i), None)
        slots = positions[keep] % slots_i
        self.k[i][:, slots] = k[:, keep]
        self.v[i][:, slots] = v[:, keep]

    def advance(self, positions: torch.Tensor) -> None:
        """Record that the chunk at `positions` is now cached (call after every layer wrote)."""
        for layer_positions in self.positions:
            slots_i = len(layer_positions)
            keep = positions[max(0, len(positions) - slots_i) :]
            layer_positions[keep % slots_i] = keep
        self.length += len(positions)
