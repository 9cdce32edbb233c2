"""The Mistral model in JAX/Equinox."""

from model_jax.cache import KVCache
from model_jax.generate import generate
from model_jax.loading import load_model
from model_jax.model import Transformer

__all__ = ["KVCache", "Transformer", "generate", "load_model"]
