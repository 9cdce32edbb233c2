"""Greedy generation agreement between the reference and the port, judged against the
reference's own (`docs/verification.md`, "Generation").

The reference's greedy continuations are computed while the reference is resident; the port's
own continuations and its teacher-forced top-1 along the reference's continuation (one early
flip does not hide the rest) while the port is. What a faithful port may disagree on comes from
the reference itself: in bf16, its fp32 run along its own bf16 continuation (and the peer's
bf16 run, where there is one) shows how many choices are near-ties that rounding alone flips;
in fp32, a flip where the reference prefers its token by less than its own fp32 noise is a
near-tie, not a fault.
"""

import math

import jax
import numpy as np

import model_jax
import reference_torch
from checkpoint.tokenizer import Tokenizer
from verify.implementation import Implementation, WholeForward
from verify.results import GenerationPrompt, GenerationResult
from verify.runners import padded_length
from verify.vocab import embed_prompts, head_states

MARGIN_SIGMAS = 3.0  # binomial margin on the number of disagreements
BF16_NOISE_SOURCES = 1  # measured: a faithful port flips as often as the reference's fp32 run


def reference_continuations(
    reference: reference_torch.Transformer, prompts: list[list[int]], max_new_tokens: int
) -> list[list[int]]:
    return reference_torch.generate(reference, prompts, max_new_tokens=max_new_tokens)[0]


def generation_agreement(
    port: model_jax.Transformer,
    prompts: list[list[int]],
    reference_ids: list[list[int]],
    reference_logits: list[np.ndarray],
    max_new_tokens: int,
    tokenizer: Tokenizer,
) -> GenerationResult:
    """Exact matches, matched prefix, first divergence, and the port's teacher-forced top-1
    agreement along the reference's continuation; at each disagreement, how much the
    reference preferred its own token (its logit gap), for the near-tie rule."""
    port_out = model_jax.generate(port, prompts, max_new_tokens=max_new_tokens)
    per_prompt = []
    for prompt, ref_ids, port_ids, ref_logits in zip(
        prompts, reference_ids, port_out, reference_logits, strict=True
    ):
        prefix = next(
            (i for i, (a, b) in enumerate(zip(ref_ids, port_ids, strict=False)) if a != b),
            min(len(ref_ids), len(port_ids)),
        )
        forced = _argmax_along(port, prompt + ref_ids[:-1])[len(prompt) - 1 :]
        agree = forced == np.asarray(ref_ids)
        rows = np.flatnonzero(~agree)
        gaps = ref_logits[rows, np.asarray(ref_ids)[rows]] - ref_logits[rows, forced[rows]]
        per_prompt.append(
            GenerationPrompt(
                reference_ids=tuple(ref_ids),
                port_ids=tuple(port_ids),
                reference_text=tokenizer.decode(ref_ids),
                port_text=tokenizer.decode(port_ids),
                exact_match=ref_ids == port_ids,
                matched_prefix=prefix,
                first_divergence=None if ref_ids == port_ids else prefix,
                teacher_forced_top1=float(agree.mean()),
                flip_gaps=tuple(float(g) for g in gaps),
            )
        )
    tokens = sum(len(ids) for ids in reference_ids)
    disagreements = sum(len(p.flip_gaps) for p in per_prompt)
    return GenerationResult(
        max_new_tokens=max_new_tokens,
        exact_match_prompts=sum(p.exact_match for p in per_prompt),
        prompts=tuple(per_prompt),
        teacher_forced_top1=1 - disagreements / tokens,
        tokens=tokens,
        disagreements=disagreements,
    )


def forced_logits(
    runner: WholeForward, model, prompts: list[list[int]], continuations: list[list[int]]
) -> list[np.ndarray]:
    """A whole model's logits at the positions that predict each continuation token."""
    out = []
    for prompt, ids in zip(prompts, continuations, strict=True):
        logits = runner.forward_hidden(model, prompt + ids[:-1])[1]
        out.append(logits[len(prompt) - 1 :])
    return out


def streamed_top1(
    runner: Implementation, dtype: str, prompts: list[list[int]], continuations: list[list[int]]
) -> list[np.ndarray]:
    """The top-1 along each continuation of an implementation held one group at a time
    (the reference in fp32 while only its bf16 model was loaded whole)."""
    sequences = [p + ids[:-1] for p, ids in zip(prompts, continuations, strict=True)]
    states = embed_prompts(runner, dtype, sequences)
    for g in range(len(runner.args.layer_groups)):
        group = runner.group(g, dtype)
        states = [runner.run_group(group, h)[-1] for h in states]
        del group
    logits = [logits for _, logits in head_states(runner, dtype, states)]
    return [lg[len(p) - 1 :].argmax(-1) for lg, p in zip(logits, prompts, strict=True)]


def allowed_disagreements(baseline: int, sources: int = 1) -> int:
    """Disagreements a faithful run may have where a baseline run (the reference's own) has
    `baseline`, with `sources`× its rounding noise, plus a binomial margin."""
    expected = sources * baseline
    return math.floor(expected + MARGIN_SIGMAS * math.sqrt(expected + 1))


def _argmax_along(port: model_jax.Transformer, tokens: list[int]) -> np.ndarray:
    """The port's top-1 at every position, the sequence padded at the end to a length bucket
    (causal: padding cannot change earlier positions), through the same compiled forward as
    the free-running states."""
    padded = np.zeros(padded_length(len(tokens)), np.int32)
    padded[: len(tokens)] = tokens
    logits = np.asarray(port.forward_hidden(jax.device_put(padded))[0])
    return logits[: len(tokens)].argmax(-1)
