"""Greedy generation agreement between the reference and the port (DESIGN.md §5).

Split in two so each whole model is loaded once: the reference's continuations are computed
while the reference is resident, then compared with the port's while the port is."""

import jax
import numpy as np

import model_jax
import reference_torch
from checkpoint.tokenizer import Tokenizer
from verify.results import GenerationPrompt, GenerationResult
from verify.runners import padded_length


def reference_continuations(
    reference: reference_torch.Transformer, prompts: list[list[int]], max_new_tokens: int
) -> list[list[int]]:
    return reference_torch.generate(reference, prompts, max_new_tokens=max_new_tokens)[0]


def generation_agreement(
    port: model_jax.Transformer,
    prompts: list[list[int]],
    reference_ids: list[list[int]],
    max_new_tokens: int,
    tokenizer: Tokenizer,
) -> GenerationResult:
    """Exact matches, matched prefix, first divergence, and the port's teacher-forced top-1
    agreement along the reference's continuation (one early flip does not hide the rest)."""
    port_out = model_jax.generate(port, prompts, max_new_tokens=max_new_tokens)
    per_prompt, agree, total = [], 0, 0
    for prompt, ref_ids, port_ids in zip(prompts, reference_ids, port_out, strict=True):
        prefix = next(
            (i for i, (a, b) in enumerate(zip(ref_ids, port_ids, strict=False)) if a != b),
            min(len(ref_ids), len(port_ids)),
        )
        forced = _argmax_along(port, prompt + ref_ids[:-1])[len(prompt) - 1 :]
        matches = int(np.sum(forced == np.asarray(ref_ids)))
        agree, total = agree + matches, total + len(ref_ids)
        per_prompt.append(
            GenerationPrompt(
                reference_ids=tuple(ref_ids),
                port_ids=tuple(port_ids),
                reference_text=tokenizer.decode(ref_ids),
                port_text=tokenizer.decode(port_ids),
                exact_match=ref_ids == port_ids,
                matched_prefix=prefix,
                first_divergence=None if ref_ids == port_ids else prefix,
                teacher_forced_top1=matches / len(ref_ids),
            )
        )
    return GenerationResult(
        max_new_tokens=max_new_tokens,
        exact_match_prompts=sum(p.exact_match for p in per_prompt),
        prompts=tuple(per_prompt),
        teacher_forced_top1=agree / total,
    )


def _argmax_along(port: model_jax.Transformer, tokens: list[int]) -> np.ndarray:
    """The port's top-1 at every position, the sequence padded at the end to a length bucket
    (causal: padding cannot change earlier positions), through the same compiled forward as
    the free-running states."""
    padded = np.zeros(padded_length(len(tokens)), np.int32)
    padded[: len(tokens)] = tokens
    logits = np.asarray(port.forward_hidden(jax.device_put(padded))[0])
    return logits[: len(tokens)].argmax(-1)
