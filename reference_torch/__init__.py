"""Faithful torch port of the official Mistral reference (the ground truth for parity)."""

from reference_torch.cache import RollingKVCache
from reference_torch.generate import generate
from reference_torch.model import Transformer

__all__ = ["RollingKVCache", "Transformer", "generate"]
