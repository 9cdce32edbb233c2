"""mistral-verify: layer-by-layer parity of the JAX port against the torch reference."""

import os

# torch's large CPU buffers on transparent huge pages (2 MiB aligned and madvised): casting a
# block's weights to fp32 and float64 then faults in far fewer pages. torch reads this once,
# when it is first imported; a user's own setting wins.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from verify.gates import Thresholds
from verify.prompts import Prompt, read_prompts
from verify.results import Report
from verify.run import run_verification, share_the_gpu_with_torch

__all__ = ["Prompt", "Report", "Thresholds", "read_prompts", "run_verification"]

share_the_gpu_with_torch()  # before JAX's backend starts (see its docstring)
