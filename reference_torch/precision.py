"""The reference's upcasts, generalised: where mistral-inference computes in float32
(`x.float()`: norms, RoPE, softmax, logits), compute in *at least* float32. For bf16 and fp32
models nothing changes; a float64 model stays float64 throughout, so verify can run the
reference in float64 as the truth fp32 is judged against (`docs/verification.md`)."""

import torch


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """x in float32, or in its own dtype if that is wider (float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))
