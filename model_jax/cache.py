"""Rolling-buffer KV cache as an immutable pytree — mirrors `reference_torch/cache.py`.

Layers repeat the window pattern of params.json (`ModelArgs.window_pattern`), so the cache holds
one buffer per position in that pattern, stacked over the groups of layers: W slots where the
window is W, the whole capacity where attention is full. Absolute position p lives in slot
p % slots; `positions[k][s]` is the position slot s holds (-1: empty). Attention masks by these
positions, so the buffer is never un-rolled.
"""

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, Shaped

from checkpoint.args import ModelArgs, cache_slots, cached_shapes
from checkpoint.dtypes import jax_dtype


class KVCache(eqx.Module):
    # One per pattern position: keys and values (groups, slots, kv_heads, head_dim), or for
    # latent attention the kv latent (groups, slots, kv_lora_rank) and rope key (…, rope).
    k: tuple[Float[Array, "groups _slots *per_token"], ...]
    v: tuple[Float[Array, "groups _slots *per_token2"], ...]
    positions: tuple[Int[Array, " _slots"], ...]

    @classmethod
    def empty(cls, args: ModelArgs, capacity: int, dtype="bfloat16") -> "KVCache":
        """A cache for sequences up to `capacity` tokens."""
        dtype = jax_dtype(dtype)
        pattern = args.window_pattern
        groups = args.n_layers // len(pattern)
        k, v, positions = [], [], []
        first, second = cached_shapes(args)  # keys and values, or the latent and rope key
        for window in pattern:
            slots = cache_slots(window, capacity)
            k.append(jnp.zeros((groups, slots, *first), dtype))
            v.append(jnp.zeros((groups, slots, *second), dtype))
            positions.append(jnp.full((slots,), -1, jnp.int32))
        return cls(tuple(k), tuple(v), tuple(positions))

    @property
    def slots(self) -> tuple[int, ...]:
        """Slots of each pattern position's buffer."""
        return tuple(p.shape[-1] for p in self.positions)


def write_slots(
    buffer: Shaped[Array, " slots *rest"],
    new: Shaped[Array, " chunk *rest"],
    positions: Int[Array, " chunk"],
) -> Shaped[Array, " slots *rest"]:
    """Store the chunk's entries at slot p % slots, keeping only the last `slots` positions.

    Padding (position -1) is dropped, so a padded chunk never overwrites cached entries.
    """
    slots = buffer.shape[0]
    keep = (positions >= 0) & (positions > positions.max() - slots)
    index = jnp.where(keep, positions % slots, slots)  # slots: out of range → dropped
    return buffer.at[index].set(new.astype(buffer.dtype), mode="drop")
