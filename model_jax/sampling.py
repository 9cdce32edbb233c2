"""Token choice: greedy, or temperature + top-k + top-p (nucleus) sampling.

top-p follows the official `sample_top_p` (mistral-inference `generate.py`): sort descending,
drop a token when the probability mass before it already reaches p (so the most likely token is
always kept). top-k keeps the k highest-ranked tokens, ties broken by token id (a stable sort),
so exactly k survive.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray


def keep_mask(
    logits: Float[Array, " vocab"], temperature: float, top_p: float, top_k: int
) -> Bool[Array, " vocab"]:
    """Which tokens stay eligible after top-k and top-p at this temperature."""
    order = jnp.argsort(-logits, stable=True)  # best first; ties: lower id first
    ranks = jnp.empty_like(order).at[order].set(jnp.arange(order.shape[0]))
    keep = jnp.ones(logits.shape, bool)
    if top_k > 0:
        keep &= ranks < top_k
    if top_p < 1.0:
        probs_sorted = jax.nn.softmax(logits[order] / temperature)
        mass_before = jnp.cumsum(probs_sorted) - probs_sorted
        keep &= (mass_before <= top_p)[ranks]
    return keep


def choose_tokens(
    logits: Float[Array, "batch vocab"],
    key: PRNGKeyArray | None,
    *,
    temperature: float,
    top_p: float,
    top_k: int,
) -> tuple[Int[Array, " batch"], Float[Array, " batch"]]:
    """Next token per row and its log-probability under the model (untempered, unfiltered)."""
    if temperature == 0.0:
        tokens = jnp.argmax(logits, axis=-1)
    else:
        keep = jax.vmap(lambda row: keep_mask(row, temperature, top_p, top_k))(logits)
        tempered = jnp.where(keep, logits / temperature, -jnp.inf)
        tokens = jax.random.categorical(key, tempered, axis=-1)
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    return tokens.astype(jnp.int32), jnp.take_along_axis(logprobs, tokens[:, None], -1)[:, 0]
