"""mistral-verify: layer-by-layer parity of the JAX port against the torch reference."""

from verify.gates import Thresholds
from verify.prompts import Prompt, read_prompts
from verify.results import Report
from verify.run import run_verification, share_the_gpu_with_torch

__all__ = ["Prompt", "Report", "Thresholds", "read_prompts", "run_verification"]

share_the_gpu_with_torch()  # before JAX's backend starts (see its docstring)
