"""A run's drift sums judged by the gates: every layer, the logits, each prompt alone, and
the generation against the reference's own agreement (`docs/verification.md`)."""

import dataclasses

import numpy as np

from verify.drift import Drift, free_sums
from verify.gates import (
    Thresholds,
    free_failures,
    free_figures,
    layer_result,
    prompt_piece_failures,
)
from verify.generation import BF16_NOISE_SOURCES, allowed_disagreements
from verify.metrics import logit_metrics
from verify.prompts import Prompt
from verify.results import (
    Checksums,
    GenerationResult,
    LayerResult,
    LogitResult,
    PeerLogits,
    PromptResult,
    Report,
)

NEAR_TIE_NOISE = 4.0  # fp32: a flip within this many times the reference's fp32 noise is a tie


def judge(
    result: Drift,
    prompts: list[Prompt],
    dtype: str,
    t: Thresholds,
    generation: GenerationResult | None,
    checksum_problems: list[str],
    peer_logits: dict | None,
    checksums: Checksums,
    settings: dict,
) -> Report:
    bf16 = dtype == "bfloat16"
    n = len(result.layers)
    layers = [
        layer_result(layer, bf16, t, gated=(k == n - 1)) for k, layer in enumerate(result.layers)
    ]
    logit_sums = free_sums(result.logits, peer_logits, result.rerouted)
    logits = _logit_result(result, dtype, t, logit_sums, peer_logits)
    prompt_results = _prompt_results(result, layers, logit_sums, prompts, t)
    reasons = [f"checksum: {p}" for p in checksum_problems]
    reasons += [f"{layer.name}: {f}" for layer in layers for f in layer.failures]
    reasons += [f"logits: {f}" for f in logits.failures]
    if generation is not None:
        generation = _judge_generation(generation, result, bf16)
        unexplained = generation.disagreements - generation.near_ties
        if unexplained > generation.allowed_disagreements:
            reasons.append(f"generation: {_generation_failure(generation, bf16)}")
    reasons += [
        f"prompt {j + 1} ({p.kind}, {p.tokens} tokens): {f}"
        for j, p in enumerate(prompt_results)
        for f in p.failures
    ]
    failing_blocks = [
        layer.index
        for layer in layers
        if layer.index is not None
        and (
            layer.failures or any(_prompt_block_failures(layer, k, t) for k in range(len(prompts)))
        )
    ]
    return Report(
        verdict="fail" if reasons else "pass",
        reasons=tuple(reasons),
        first_failing_layer=min(failing_blocks, default=None),
        failing_blocks=tuple(failing_blocks),
        embeddings=layers[0],
        layers=tuple(layers[1:-1]),
        final_norm=layers[-1],
        logits=logits,
        generation=generation,
        checksums=checksums,
        thresholds=dict(t.__dict__),
        prompts=tuple(prompt_results),
        **settings,
    )


def _judge_generation(gen: GenerationResult, result: Drift, bf16: bool) -> GenerationResult:
    """How many of the port's disagreements a faithful port may have: in bf16, twice the
    reference's own fp32 run's (two bf16 roundings instead of one), or the peer's, plus a
    binomial margin; in fp32, none beyond near-ties (the reference's gap within 4× its own fp32
    noise on the prompts' logits)."""
    if bf16:
        baseline = round((1 - gen.reference_fp32_top1) * gen.tokens)
        allowed = allowed_disagreements(baseline, BF16_NOISE_SOURCES)
        if gen.peer_top1 is not None:
            peer = round((1 - gen.peer_top1) * gen.tokens)
            allowed = max(allowed, allowed_disagreements(peer))
        return dataclasses.replace(gen, allowed_disagreements=allowed)
    noise = max(
        float(np.abs(r32 - r64).max())
        for r32, r64 in zip(result.logits["R32"], result.logits["R64"], strict=True)
    )
    gaps = [g for p in gen.prompts for g in p.flip_gaps]
    near = sum(g <= NEAR_TIE_NOISE * noise for g in gaps)
    return dataclasses.replace(gen, near_ties=near, fp32_logit_noise=noise, allowed_disagreements=0)


def _generation_failure(gen: GenerationResult, bf16: bool) -> str:
    told = (
        f"the port's top-1 differs from the reference's continuation on {gen.disagreements} of "
        f"{gen.tokens} tokens"
    )
    if bf16:
        peer = f", its peer's {1 - gen.peer_top1:.1%}" if gen.peer_top1 is not None else ""
        return (
            f"{told}; the reference's own fp32 run differs on {1 - gen.reference_fp32_top1:.1%}"
            f"{peer}: at most {gen.allowed_disagreements} allowed"
        )
    return f"{told}, {gen.disagreements - gen.near_ties} of them not near-ties (fp32)"


def _logit_result(result: Drift, dtype: str, t: Thresholds, sums: list, peer_logits) -> LogitResult:
    bf16 = dtype == "bfloat16"
    port, ref = ("P16", "R16") if bf16 else ("P32", "R32")
    pooled = free_figures(sums, bf16, t)
    peer = None
    if peer_logits is not None:
        peer = PeerLogits(
            metrics=logit_metrics(
                np.concatenate(peer_logits[dtype]), np.concatenate(result.logits[ref])
            ),
            bf16_ratio=pooled.peer_bf16_ratio,
            fp32_error=pooled.peer_fp32_error,
        )
    return LogitResult(
        metrics=logit_metrics(
            np.concatenate(result.logits[port]), np.concatenate(result.logits[ref])
        ),
        floor=pooled.floor,
        bf16_ratio=pooled.bf16_ratio,
        fp32_error=pooled.fp32_error,
        fp32_ratio=pooled.fp32_ratio,
        nonfinite=pooled.nonfinite,
        peer=peer,
        failures=tuple(free_failures("output", pooled, t)),
        rerouted=int(sum(r.sum() for r in result.rerouted)),
    )


def _prompt_block_failures(layer: LayerResult, j: int, t: Thresholds) -> list[str]:
    return [f for p in layer.pieces for f in prompt_piece_failures(p, j, t)]


def _prompt_results(
    result: Drift, layers: list[LayerResult], logit_sums: list, prompts: list[Prompt], t: Thresholds
) -> list[PromptResult]:
    """Each prompt judged alone: teacher-forced pieces of every block, final norm, logits."""
    out = []
    for j, prompt in enumerate(prompts):
        failures = [
            f"{layer.name} {f}" for layer in layers for f in _prompt_block_failures(layer, j, t)
        ]
        final = result.layers[-1].free_prompts[j]
        for what, sums in (("final norm", final), ("logits", logit_sums[j])):
            figures = free_figures([sums], bf16=False, t=t)
            failures += [f for f in free_failures(what, figures, t) if "fp32" in f or "NaN" in f]
        out.append(
            PromptResult(
                kind=prompt.kind,
                text=prompt.text if len(prompt.text) <= 120 else prompt.text[:117] + "...",
                tokens=len(prompt.tokens),
                bos=prompt.bos,
                verdict="fail" if failures else "pass",
                failures=tuple(failures),
            )
        )
    return out
