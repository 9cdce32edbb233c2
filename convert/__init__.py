"""mistral-convert: official or HF folders (or a hub repo id) to sharded safetensors for the
JAX model, or to an HF transformers folder; `--check` re-verifies a conversion."""

from convert.check import check_converted
from convert.convert import convert_checkpoint

__all__ = ["check_converted", "convert_checkpoint"]
