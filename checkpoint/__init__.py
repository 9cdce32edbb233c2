"""The shared description of an official Mistral checkpoint: params, key/shape spec, readers."""

from checkpoint.args import ModelArgs, MoeArgs
from checkpoint.errors import CheckpointError
from checkpoint.spec import tensor_spec

__all__ = ["CheckpointError", "ModelArgs", "MoeArgs", "tensor_spec"]
