"""Rolling-buffer KV cache as an immutable pytree — mirrors `reference_torch/cache.py`.

Absolute position p lives in slot p % slots; `positions[s]` is the position slot s holds
(-1: empty). Attention masks by these positions, so the buffer is never un-rolled.
"""

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, Shaped

from checkpoint.args import ModelArgs


class KVCache(eqx.Module):
    k: Float[Array, "layers slots kv_heads head_dim"]
    v: Float[Array, "layers slots kv_heads head_dim"]
    positions: Int[Array, " slots"]

    @classmethod
    def empty(cls, args: ModelArgs, capacity: int, dtype=jnp.bfloat16) -> "KVCache":
        """A cache for sequences up to `capacity` tokens; a window caps the slots at W."""
        slots = min(capacity, args.sliding_window) if args.sliding_window else capacity
        shape = (args.n_layers, slots, args.n_kv_heads, args.head_dim)
        return cls(
            jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.full((slots,), -1, jnp.int32)
        )

    @property
    def slots(self) -> int:
        return self.positions.shape[0]


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
