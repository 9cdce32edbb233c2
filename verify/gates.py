"""Pass/fail gates and the judging of drift sums against them (DESIGN.md §5; README "Gates").

Every gate compares one statistic that is ≈1 (bf16 ratios) or ≈1e-7 (fp32 errors) for a
faithful port, and every comparison is written `not (value <= limit)`, so NaN fails.

- bf16, teacher-forced, every piece of every block: the port's error against the fp32
  reference on the same bf16 input, ÷ the reference's own bf16 error there (scale-aware,
  verify/metrics.py). Pooled over the prompts ≤ 1.1: clean ports measure ≤ 1.00 (CPU: the
  norms and attention round exactly as the reference, the FFN is more accurate, 0.84), the
  subtlest faults (one coherent extra rounding: RMSNorm or softmax without fp32) ≥ 1.17.
  Each prompt alone ≤ 1.5: a one-token prompt has only `dim` elements, and clean ones reach
  1.27 there (≤ 1.06 from six tokens on); this gate catches faults only some prompts trigger
  (windows, BOS, chat templates), which are large.
- fp32, teacher-forced, every piece of every block, pooled and per prompt: ≤ 1e-5.
- free-running, final norm and logits: bf16 ratio ≤ 1.25 (pooled); fp32 error ≤ 1e-5.
- generation (greedy) teacher-forced top-1 along the reference's continuation: ≥ 0.85 in bf16
  (bf16 rounding alone flips a few % on random weights), 1.0 in fp32.
- any NaN/Inf in the port where the reference is finite.
Calibration (clean runs vs injected faults, random and trained-like weights): README "Gates",
tests/test_gates.py.
"""

import dataclasses
import math

from verify.drift import FreeSums, LayerSums, PieceSums
from verify.metrics import ErrorSums, ratio
from verify.results import LayerResult, PieceResult


@dataclasses.dataclass(frozen=True)
class Thresholds:
    teacher_forced_bf16_ratio: float = 1.1
    teacher_forced_bf16_ratio_per_prompt: float = 1.5
    teacher_forced_fp32_error: float = 1e-5
    free_bf16_ratio: float = 1.25  # at the final norm and the logits
    free_fp32_error: float = 1e-5
    generation_teacher_forced_top1_bf16: float = 0.85
    generation_teacher_forced_top1_fp32: float = 1.0

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"threshold {field.name} must be a number, got {value!r}")
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"threshold {field.name} must be finite and > 0, got {value!r}")

    @classmethod
    def parse(cls, text: str | None) -> "Thresholds":
        """'name=value,name=value' overrides; ValueError naming a bad name or value."""
        if not text:
            return cls()
        names = {f.name for f in dataclasses.fields(cls)}
        values = {}
        for item in text.split(","):
            name, _, value = (part.strip() for part in item.partition("="))
            if name not in names:
                raise ValueError(
                    f"--thresholds: unknown threshold {name!r} (known: {', '.join(sorted(names))})"
                )
            try:
                values[name] = float(value)
            except ValueError:
                raise ValueError(f"--thresholds: {name}={value!r} is not a number") from None
        try:
            return cls(**values)
        except ValueError as err:
            raise ValueError(f"--thresholds: {err}") from None


def exceeds(value: float | None, limit: float) -> bool:
    """True when `value` breaks an upper limit; NaN always does."""
    return value is not None and not (value <= limit)


def _pooled(sums: list[ErrorSums]) -> ErrorSums:
    total = ErrorSums()
    for s in sums:
        total += s
    return total


def piece_result(name: str, sums: list[PieceSums], bf16: bool) -> PieceResult:
    port16, ref16 = _pooled([s.port16 for s in sums]), _pooled([s.ref16 for s in sums])
    port32 = _pooled([s.port32 for s in sums])
    return PieceResult(
        piece=name,
        bf16_ratio=ratio(port16.rms, ref16.rms) if bf16 else None,
        fp32_error=port32.rms,
        nonfinite=port16.nonfinite + port32.nonfinite,
        prompt_bf16_ratios=tuple(ratio(s.port16.rms, s.ref16.rms) for s in sums) if bf16 else (),
        prompt_fp32_errors=tuple(s.port32.rms for s in sums),
    )


def piece_failures(p: PieceResult, t: Thresholds) -> list[str]:
    """Pooled failures of one piece, each a readable phrase."""
    failures = []
    if p.nonfinite:
        failures.append(f"{p.piece}: {p.nonfinite} NaN/Inf values where the reference is finite")
    if exceeds(p.bf16_ratio, t.teacher_forced_bf16_ratio):
        failures.append(
            f"{p.piece}: teacher-forced bf16 error {p.bf16_ratio:.2f}× the reference's own "
            f"> {t.teacher_forced_bf16_ratio:g}×"
        )
    if exceeds(p.fp32_error, t.teacher_forced_fp32_error):
        failures.append(
            f"{p.piece}: teacher-forced fp32 error {p.fp32_error:.2e} "
            f"> {t.teacher_forced_fp32_error:g}"
        )
    return failures


def prompt_piece_failures(p: PieceResult, j: int, t: Thresholds) -> list[str]:
    """Failures of one piece on prompt j alone."""
    failures = []
    if p.prompt_bf16_ratios and exceeds(
        p.prompt_bf16_ratios[j], t.teacher_forced_bf16_ratio_per_prompt
    ):
        failures.append(
            f"{p.piece}: teacher-forced bf16 error {p.prompt_bf16_ratios[j]:.2f}× the "
            f"reference's own > {t.teacher_forced_bf16_ratio_per_prompt:g}×"
        )
    if exceeds(p.prompt_fp32_errors[j], t.teacher_forced_fp32_error):
        failures.append(
            f"{p.piece}: teacher-forced fp32 error {p.prompt_fp32_errors[j]:.2e} "
            f"> {t.teacher_forced_fp32_error:g}"
        )
    return failures


def free_failures(
    what: str, bf16_ratio: float | None, fp32_error: float, nonfinite: int, t: Thresholds
) -> list[str]:
    """Gates on free-running outputs (final norm, logits)."""
    failures = []
    if nonfinite:
        failures.append(f"{what}: {nonfinite} NaN/Inf values where the reference is finite")
    if exceeds(bf16_ratio, t.free_bf16_ratio):
        failures.append(
            f"{what}: free-running bf16 error {bf16_ratio:.2f}× the reference's own "
            f"> {t.free_bf16_ratio:g}×"
        )
    if exceeds(fp32_error, t.free_fp32_error):
        failures.append(f"{what}: fp32 error {fp32_error:.2e} > {t.free_fp32_error:g}")
    return failures


def free_pooled(sums: list[FreeSums], bf16: bool) -> dict:
    """Pooled free-running figures of one layer (or the logits)."""
    ref16 = _pooled([s.ref16 for s in sums])
    port16, port32 = _pooled([s.port16 for s in sums]), _pooled([s.port32 for s in sums])
    peer16, peer32 = _pooled([s.peer16 for s in sums]), _pooled([s.peer32 for s in sums])
    has_peer = peer32.count > 0
    return {
        "floor": ref16.rms if bf16 else None,
        "bf16_ratio": ratio(port16.rms, ref16.rms) if bf16 else None,
        "fp32_error": port32.rms,
        "nonfinite": port16.nonfinite + port32.nonfinite,
        "peer_bf16_ratio": ratio(peer16.rms, ref16.rms) if bf16 and has_peer else None,
        "peer_fp32_error": peer32.rms if has_peer else None,
    }


def layer_result(layer: LayerSums, bf16: bool, t: Thresholds, gated: bool) -> LayerResult:
    """A layer's figures and its pooled failures; `gated`: free-running gates apply here
    (the final norm)."""
    pieces = tuple(piece_result(name, sums, bf16) for name, sums in layer.pieces.items())
    free = free_pooled(layer.free_prompts, bf16)
    failures = [f for p in pieces for f in piece_failures(p, t)]
    if gated:
        failures += free_failures(
            "output", free["bf16_ratio"], free["fp32_error"], free["nonfinite"], t
        )
    return LayerResult(
        name=layer.name,
        index=layer.index,
        free=layer.free,
        free_floor=free["floor"],
        free_bf16_ratio=free["bf16_ratio"],
        free_fp32_error=free["fp32_error"],
        free_nonfinite=free["nonfinite"],
        peer_bf16_ratio=free["peer_bf16_ratio"],
        peer_fp32_error=free["peer_fp32_error"],
        pieces=pieces,
        failures=tuple(failures),
    )
