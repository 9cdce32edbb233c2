"""Pass/fail gates and the judging of drift sums against them (`docs/verification.md`).

Every gate is relative to the reference's own noise, and every comparison is written
`not (value <= limit)`, so NaN fails.

- bf16, teacher-forced, every piece of every block: the port's error against the fp32
  reference on the same bf16 input ÷ the reference's own bf16 error there (scale-aware,
  verify/metrics.py), no token weighing more than `token_weight_cap` typical tokens. The limit
  is `teacher_forced_bf16_ratio` for a ratio resting on many tokens and widens by
  `bf16_token_noise / √(effective tokens)` for one resting on few: the ratio of two rounding
  errors on one token is itself noisy. Judged pooled over the prompts and on each prompt alone
  (faults only some prompts trigger: windows, BOS, chat templates).
- fp32, teacher-forced, every piece of every block, pooled and per prompt: ≤
  `teacher_forced_fp32_error` (a piece's fp32 error does not grow with depth).
- free-running, final norm and logits: bf16 ratio as above with `free_bf16_ratio`; fp32: the
  port's error against the reference run in float64 ÷ the reference's own fp32 error against
  it ≤ `free_fp32_ratio` (fp32 rounding accumulates with depth, for both alike).
- generation: disagreements with the reference's continuation judged against the reference's
  own (verify/generation.py).
- any NaN/Inf in the port where the reference is finite.
Calibration (clean runs vs injected faults on trained-like configs): tests/test_gates.py,
benchmarks/gate_table.py.
"""

import dataclasses
import math

from verify.drift import FreeSums, LayerSums, PieceSums
from verify.metrics import ErrorSums, MismatchSums, TokenRatio, token_weighted_ratio
from verify.results import LayerResult, PieceResult


@dataclasses.dataclass(frozen=True)
class Thresholds:
    teacher_forced_bf16_ratio: float = 1.08
    teacher_forced_fp32_error: float = 1e-5
    free_bf16_ratio: float = 1.25  # at the final norm and the logits
    free_fp32_ratio: float = 2.0  # the port's fp32 error vs float64 ÷ the reference's own
    # …which widens by this ÷ √(effective tokens): on one token it is a ratio of two roundings,
    # heavy-tailed (the reference's own error on a token can be small by chance): single
    # tokens of the gate table's clean runs reach 5.2× (÷ the backend factor), a one-token
    # prompt 4.2× on another CPU; 4 allows 6× on one token, 2.4× on 100.
    fp32_token_noise: float = 4.0
    # A bf16 limit widens by (this many × the ratio's token-to-token spread, at least
    # `bf16_token_noise`) ÷ √(effective tokens): one token's ratio is noisy.
    bf16_noise_sigmas: float = 4.0
    bf16_token_noise: float = 0.2
    # No token weighs more than this many typical tokens in a bf16 ratio (a cancellation).
    token_weight_cap: float = 4.0

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

    def bf16_limit(self, base: float, ratio: TokenRatio, spread: float) -> float:
        """The limit of a bf16 ratio resting on `ratio.effective_tokens` tokens whose
        token-to-token spread (over all the piece's tokens) is `spread`."""
        noise = max(self.bf16_token_noise, self.bf16_noise_sigmas * spread)
        return base + noise / math.sqrt(max(ratio.effective_tokens, 1.0))

    def fp32_limit(self, ratio: TokenRatio) -> float:
        """The limit of a free-running fp32 ratio (against float64) resting on
        `ratio.effective_tokens` tokens."""
        return self.free_fp32_ratio + self.fp32_token_noise / math.sqrt(
            max(ratio.effective_tokens, 1.0)
        )


def exceeds(value: float | None, limit: float) -> bool:
    """True when `value` breaks an upper limit; NaN always does."""
    return value is not None and not (value <= limit)


def _pooled(sums: list[ErrorSums]) -> ErrorSums:
    total = ErrorSums()
    for s in sums:
        total += s
    return total


def _pooled_mismatch(sums: list[MismatchSums]) -> MismatchSums:
    total = MismatchSums()
    for s in sums:
        total += s
    return total


def piece_result(name: str, sums: list[PieceSums], bf16: bool, t: Thresholds) -> PieceResult:
    port16, ref16 = _pooled([s.port16 for s in sums]), _pooled([s.ref16 for s in sums])
    port32 = _pooled([s.port32 for s in sums])
    mismatches = {
        which: _pooled_mismatch([getattr(s, f"{which}_mismatch") for s in sums])
        for which in ("port16", "ref16", "port32")
    }
    integer = mismatches["port32"].count > 0
    exact = bf16 and port16.count > 0 and ref16.rms == 0  # computed in fp32 by both
    rated = bf16 and port16.count > 0 and not exact
    pooled = token_weighted_ratio(port16, ref16, t.token_weight_cap) if rated else None
    prompts = [token_weighted_ratio(s.port16, s.ref16, t.token_weight_cap) for s in sums]
    base = t.teacher_forced_bf16_ratio
    return PieceResult(
        piece=name,
        bf16_ratio=pooled.value if pooled else None,
        bf16_limit=t.bf16_limit(base, pooled, pooled.token_spread) if pooled else None,
        fp32_error=port32.rms,
        nonfinite=port16.nonfinite + port32.nonfinite,
        prompt_bf16_ratios=tuple(r.value for r in prompts) if rated else (),
        prompt_bf16_limits=(
            tuple(t.bf16_limit(base, r, pooled.token_spread) for r in prompts) if rated else ()
        ),
        prompt_fp32_errors=tuple(s.port32.rms for s in sums),
        integer_mismatch_bf16=mismatches["port16"].fraction if integer and bf16 else None,
        integer_mismatch_ref16=mismatches["ref16"].fraction if integer and bf16 else None,
        integer_mismatch_fp32=mismatches["port32"].fraction if integer else None,
        integer_tokens=mismatches["port32"].count,
        integer_unexplained_bf16=mismatches["port16"].unexplained if integer and bf16 else None,
        integer_unexplained_ref16=mismatches["ref16"].unexplained if integer and bf16 else None,
        integer_unexplained_fp32=mismatches["port32"].unexplained if integer else None,
        rerouted=sum(s.rerouted for s in sums),
        bf16_exact_error=port16.rms if exact else None,
    )


def _bf16_failure(what: str, value: float, limit: float) -> str:
    return f"{what} bf16 error {value:.2f}× the reference's own > {limit:.3g}×"


def piece_failures(p: PieceResult, t: Thresholds) -> list[str]:
    """Pooled failures of one piece, each a readable phrase."""
    failures = []
    if p.nonfinite:
        failures.append(f"{p.piece}: {p.nonfinite} NaN/Inf values where the reference is finite")
    if p.bf16_ratio is not None and exceeds(p.bf16_ratio, p.bf16_limit):
        failures.append(f"{p.piece}: {_bf16_failure('teacher-forced', p.bf16_ratio, p.bf16_limit)}")
    if exceeds(p.fp32_error, t.teacher_forced_fp32_error):
        failures.append(
            f"{p.piece}: teacher-forced fp32 error {p.fp32_error:.2e} "
            f"> {t.teacher_forced_fp32_error:g}"
        )
    if exceeds(p.bf16_exact_error, t.teacher_forced_fp32_error):
        failures.append(
            f"{p.piece}: computed in fp32 in a bf16 run, error {p.bf16_exact_error:.2e} "
            f"> {t.teacher_forced_fp32_error:g}"
        )
    failures += routing_failures(p)
    return failures


def routing_failures(p: PieceResult) -> list[str]:
    """An integer output (a router's choice) may differ from the truth's, beyond near-ties,
    on no more tokens than the reference's own bf16 run does plus a binomial margin (bf16), and
    on none in fp32."""
    failures = []
    if p.integer_unexplained_bf16 is not None:
        baseline = p.integer_unexplained_ref16
        allowed = math.floor(baseline + 3 * math.sqrt(baseline + 1))
        if p.integer_unexplained_bf16 > allowed:
            failures.append(
                f"{p.piece}: {p.integer_unexplained_bf16} of {p.integer_tokens} tokens choose "
                f"other experts than the fp32 reference (not near-ties); the reference's own "
                f"bf16 run: {baseline}, at most {allowed} allowed"
            )
    if p.integer_unexplained_fp32:
        failures.append(
            f"{p.piece}: {p.integer_unexplained_fp32} of {p.integer_tokens} tokens choose other "
            "experts than the reference in fp32 (not near-ties)"
        )
    return failures


def prompt_piece_failures(p: PieceResult, j: int, t: Thresholds) -> list[str]:
    """Failures of one piece on prompt j alone."""
    failures = []
    if p.prompt_bf16_ratios and exceeds(p.prompt_bf16_ratios[j], p.prompt_bf16_limits[j]):
        failures.append(
            f"{p.piece}: "
            f"{_bf16_failure('teacher-forced', p.prompt_bf16_ratios[j], p.prompt_bf16_limits[j])}"
        )
    if exceeds(p.prompt_fp32_errors[j], t.teacher_forced_fp32_error):
        failures.append(
            f"{p.piece}: teacher-forced fp32 error {p.prompt_fp32_errors[j]:.2e} "
            f"> {t.teacher_forced_fp32_error:g}"
        )
    return failures


@dataclasses.dataclass(frozen=True)
class FreeFigures:
    """Free-running figures of one layer (or the logits), pooled or of one prompt."""

    floor: float | None  # the reference's own bf16 error
    bf16_ratio: float | None
    bf16_limit: float | None
    fp32_error: float  # the port against the reference, both fp32
    fp32_floor: float | None  # the reference's own fp32 error against its float64 run
    fp32_ratio: float | None  # the port's fp32 error against float64 ÷ that floor
    fp32_limit: float | None
    nonfinite: int
    peer_bf16_ratio: float | None
    peer_fp32_error: float | None


def free_figures(sums: list[FreeSums], bf16: bool, t: Thresholds) -> FreeFigures:
    ref16 = _pooled([s.ref16 for s in sums])
    port16, port32 = _pooled([s.port16 for s in sums]), _pooled([s.port32 for s in sums])
    peer16, peer32 = _pooled([s.peer16 for s in sums]), _pooled([s.peer32 for s in sums])
    ref64, port64 = _pooled([s.ref32_64 for s in sums]), _pooled([s.port32_64 for s in sums])
    cap, has_peer, exact = t.token_weight_cap, peer32.count > 0, ref64.count > 0
    bf16_ratio = token_weighted_ratio(port16, ref16, cap) if bf16 else None
    fp32_ratio = token_weighted_ratio(port64, ref64, cap) if exact else None
    return FreeFigures(
        floor=ref16.rms if bf16 else None,
        bf16_ratio=bf16_ratio.value if bf16_ratio else None,
        bf16_limit=(
            t.bf16_limit(t.free_bf16_ratio, bf16_ratio, bf16_ratio.token_spread)
            if bf16_ratio
            else None
        ),
        fp32_error=port32.rms,
        fp32_floor=ref64.rms if exact else None,
        fp32_ratio=fp32_ratio.value if fp32_ratio else None,
        fp32_limit=t.fp32_limit(fp32_ratio) if fp32_ratio else None,
        nonfinite=port16.nonfinite + port32.nonfinite,
        peer_bf16_ratio=token_weighted_ratio(peer16, ref16, cap).value
        if bf16 and has_peer
        else None,
        peer_fp32_error=peer32.rms if has_peer else None,
    )


def free_failures(what: str, f: FreeFigures, t: Thresholds) -> list[str]:
    """Gates on free-running outputs (final norm, logits)."""
    failures = []
    if f.nonfinite:
        failures.append(f"{what}: {f.nonfinite} NaN/Inf values where the reference is finite")
    if f.bf16_ratio is not None and exceeds(f.bf16_ratio, f.bf16_limit):
        failures.append(f"{what}: {_bf16_failure('free-running', f.bf16_ratio, f.bf16_limit)}")
    if f.fp32_ratio is not None and exceeds(f.fp32_ratio, f.fp32_limit):
        failures.append(
            f"{what}: fp32 error {f.fp32_ratio:.2f}× the reference's own (against float64) "
            f"> {f.fp32_limit:.3g}×"
        )
    return failures


def layer_result(layer: LayerSums, bf16: bool, t: Thresholds, gated: bool) -> LayerResult:
    """A layer's figures and its pooled failures; `gated`: free-running gates apply here
    (the final norm)."""
    pieces = tuple(piece_result(name, sums, bf16, t) for name, sums in layer.pieces.items())
    free = free_figures(layer.free_prompts, bf16, t)
    failures = [f for p in pieces for f in piece_failures(p, t)]
    if gated:
        failures += free_failures("output", free, t)
    return LayerResult(
        name=layer.name,
        index=layer.index,
        free=layer.free,
        free_floor=free.floor,
        free_bf16_ratio=free.bf16_ratio,
        free_fp32_error=free.fp32_error,
        free_fp32_ratio=free.fp32_ratio,
        free_nonfinite=free.nonfinite,
        peer_bf16_ratio=free.peer_bf16_ratio,
        peer_fp32_error=free.peer_fp32_error,
        pieces=pieces,
        failures=tuple(failures),
        free_rerouted=layer.rerouted,
    )
