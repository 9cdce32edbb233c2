"""Greedy generation agreement between the reference and the port (DESIGN.md §5)."""

import jax
import jax.numpy as jnp
import numpy as np

import model_jax
import reference_torch
from verify.runners import JAX_DTYPES, TORCH_DTYPES


def generation_agreement(
    reference: reference_torch.Transformer,
    port: model_jax.Transformer,
    prompts: list[list[int]],
    max_new_tokens: int,
) -> dict:
    """Exact matches, matched prefix, first divergence, and the port's teacher-forced top-1
    agreement along the reference's continuation (one early flip does not hide the rest)."""
    ref_out, _ = reference_torch.generate(reference, prompts, max_new_tokens=max_new_tokens)
    port_out = model_jax.generate(port, prompts, max_new_tokens=max_new_tokens)
    per_prompt, agree, total = [], 0, 0
    for prompt, ref_ids, port_ids in zip(prompts, ref_out, port_out, strict=True):
        prefix = next(
            (i for i, (a, b) in enumerate(zip(ref_ids, port_ids, strict=False)) if a != b),
            min(len(ref_ids), len(port_ids)),
        )
        logits = np.asarray(port(jnp.asarray(prompt + ref_ids[:-1], jnp.int32)))
        forced = logits[len(prompt) - 1 :].argmax(-1)
        matches = int(np.sum(forced == np.asarray(ref_ids)))
        agree, total = agree + matches, total + len(ref_ids)
        per_prompt.append(
            {
                "reference_ids": ref_ids,
                "port_ids": port_ids,
                "exact_match": ref_ids == port_ids,
                "matched_prefix": prefix,
                "first_divergence": None if ref_ids == port_ids else prefix,
                "teacher_forced_top1": matches / len(ref_ids),
            }
        )
    return {
        "max_new_tokens": max_new_tokens,
        "exact_match_prompts": sum(p["exact_match"] for p in per_prompt),
        "prompts": per_prompt,
        "teacher_forced_top1": agree / total,
    }


def load_for_generation(
    reference_folder, converted_folder, dtype: str, device: str, jax_device, mesh=None
):
    reference = reference_torch.Transformer.from_folder(
        reference_folder, dtype=TORCH_DTYPES[dtype], device=device
    )
    with jax.default_device(jax_device):
        port = model_jax.load_model(converted_folder, dtype=JAX_DTYPES[dtype], mesh=mesh)
    return reference, port
