"""Comparison metrics between a port's tensor and the truth (docs/verification.md, "Metrics"), on
numpy arrays.

The gated error is *scale-aware*: each element's error is measured against its own size,
|truth| plus the median |truth| of its token (the floor keeps near-zero elements from blowing
up), then RMS-averaged. Trained models carry a few massive activations (|h| ≈ 100–1000 at the
first token) whose rounding would otherwise dominate any L2 norm: with this yardstick every
element counts by its relative error, as bf16 rounding does.
"""

import dataclasses

import numpy as np
import torch


def _f64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def error_scale(truth: np.ndarray) -> np.ndarray:
    """|truth| + the median |truth| of each row (token), broadcastable to `truth` (float32:
    a yardstick needs no more precision)."""
    magnitude = np.abs(np.asarray(truth, np.float32))
    floor = np.median(magnitude, axis=-1, keepdims=True)
    return magnitude + np.where(floor > 0, floor, np.float32(1.0))


@dataclasses.dataclass
class ErrorSums:
    """Running sums of scaled squared errors of x against a truth, kept per token (a mutable
    accumulator; x and truth are (tokens, …)).

    Non-finite values of x where the truth is finite are counted and make the error infinite.
    """

    token_squares: list[np.ndarray] = dataclasses.field(default_factory=list)  # per add()
    token_sizes: list[int] = dataclasses.field(default_factory=list)  # elements per token
    nonfinite: int = 0

    def add(self, x, truth, scale: np.ndarray | None = None) -> None:
        """Add x's errors; `scale`: `error_scale(truth)`, when already computed.

        float32 throughout (x − truth of two float32 values within a factor 2 is exact; the
        rest is a yardstick), or float64 against a float64 truth; accumulated in float64."""
        precise = np.asarray(truth).dtype == np.float64
        dtype = np.float64 if precise else np.float32
        x, truth = np.asarray(x, dtype), np.asarray(truth, dtype)
        if not len(x):  # no tokens (all left out): nothing to add
            return
        x, truth = x.reshape(len(x), -1), truth.reshape(len(truth), -1)
        bad = ~np.isfinite(x)
        self.nonfinite += int(bad.sum())
        scale = error_scale(truth) if scale is None else np.reshape(scale, (len(x), -1))
        with np.errstate(invalid="ignore", over="ignore"):
            scaled = np.where(bad, np.inf, (x - truth) / scale)
        self.token_squares.append(np.sum(np.square(scaled), axis=-1, dtype=np.float64))
        self.token_sizes.append(x.shape[1])

    def __iadd__(self, other: "ErrorSums") -> "ErrorSums":
        self.token_squares += other.token_squares
        self.token_sizes += other.token_sizes
        self.nonfinite += other.nonfinite
        return self

    @property
    def count(self) -> int:
        """Elements added."""
        return sum(len(s) * n for s, n in zip(self.token_squares, self.token_sizes, strict=True))

    @property
    def squares(self) -> float:
        return float(sum(np.sum(s) for s in self.token_squares))

    def token_means(self) -> np.ndarray:
        """Each token's mean scaled squared error, in the order added."""
        if not self.token_squares:
            return np.zeros(0)
        sizes = [
            np.full(len(s), n) for s, n in zip(self.token_squares, self.token_sizes, strict=True)
        ]
        return np.concatenate(self.token_squares) / np.concatenate(sizes)

    @property
    def rms(self) -> float:
        """RMS scaled error (inf if x was non-finite anywhere)."""
        return float(np.sqrt(self.squares / self.count)) if self.count else 0.0


@dataclasses.dataclass(frozen=True)
class TokenRatio:
    """A bf16 ratio over tokens, how many tokens it effectively rests on, and how much the
    ratio varies from token to token (robust σ: 1.4826 × the median absolute deviation)."""

    value: float
    effective_tokens: float
    token_spread: float


def token_weighted_ratio(port: ErrorSums, ref: ErrorSums, cap: float) -> TokenRatio:
    """port's RMS error ÷ ref's over the same tokens, no token weighing more than `cap`
    typical tokens: where the reference's own error on a token exceeds `cap` × its median over
    the tokens (a catastrophic cancellation, where both bf16 paths round a huge intermediate
    apart), both errors on that token are scaled down by the same factor, so its ratio counts
    as `cap` tokens' worth. The effective number of tokens, (Σ w·b)² / Σ (w·b)², says how far
    the ratio is from resting on a single token (`ratio`'s conventions for zeros)."""
    a, b = port.token_means(), ref.token_means()
    if len(a) != len(b):
        raise ValueError("port and reference errors cover different tokens")
    if not len(a):
        return TokenRatio(0.0, 0.0, 0.0)
    typical = float(np.median(b))
    weights = np.ones_like(b)
    heavy = b > cap * typical
    weights[heavy] = cap * typical / b[heavy]
    with np.errstate(invalid="ignore"):
        numerator = float(np.sum(weights * a))
    floor = weights * b
    total = float(np.sum(floor))
    effective = total**2 / float(np.sum(floor**2)) if total > 0 else float(len(b))
    rated = (b > 0) & np.isfinite(a)
    per_token = np.sqrt(a[rated] / b[rated])
    spread = (
        1.4826 * float(np.median(np.abs(per_token - np.median(per_token)))) if rated.any() else 0.0
    )
    return TokenRatio(ratio(float(np.sqrt(numerator)), float(np.sqrt(total))), effective, spread)


@dataclasses.dataclass
class MismatchSums:
    """Running count of tokens whose integer values (a router's chosen experts, as a set)
    differ from the truth's, and of those that are near-ties: given the scores they were chosen
    from (`checkpoint.pieces`: an output `X_scores` beside `X`), a swap is a near-tie when the
    truth prefers its own set by less than what the two score vectors differ by at that token
    (2k× the largest score difference) — rounding, not a fault."""

    differing: int = 0
    near_ties: int = 0
    count: int = 0

    def add(self, x, truth, scores=None, truth_scores=None) -> None:
        x, truth = np.asarray(x), np.asarray(truth)
        x, truth = x.reshape(len(x), -1), truth.reshape(len(truth), -1)
        differ = np.any(np.sort(x, -1) != np.sort(truth, -1), axis=-1)
        self.differing += int(differ.sum())
        self.count += len(x)
        if scores is None or not differ.any():
            return
        scores = np.asarray(scores, np.float64).reshape(len(x), -1)[differ]
        truth_scores = np.asarray(truth_scores, np.float64).reshape(len(x), -1)[differ]
        rows = np.arange(len(scores))[:, None]
        gap = truth_scores[rows, truth[differ]].sum(-1) - truth_scores[rows, x[differ]].sum(-1)
        noise = 2 * x.shape[1] * np.abs(scores - truth_scores).max(-1)
        self.near_ties += int(np.sum(gap <= noise))

    def __iadd__(self, other: "MismatchSums") -> "MismatchSums":
        self.differing += other.differing
        self.near_ties += other.near_ties
        self.count += other.count
        return self

    @property
    def unexplained(self) -> int:
        """Differing tokens that are not near-ties."""
        return self.differing - self.near_ties

    @property
    def fraction(self) -> float:
        return self.differing / self.count if self.count else 0.0


def scaled_error(x, truth) -> float:
    """RMS over elements of |x − truth| / (|truth| + the token's median |truth|)."""
    sums = ErrorSums()
    sums.add(x, truth)
    return sums.rms


def ratio(error: float, floor: float) -> float:
    """error ÷ floor, with 0 ÷ 0 = 0 and x ÷ 0 = inf; NaN stays NaN."""
    if floor > 0:
        return error / floor
    return 0.0 if error == 0 else float("inf") if error > 0 else float("nan")


def _norm(x: np.ndarray) -> float:
    return float(np.sqrt(np.sum(np.square(x), dtype=np.float64)))


def relative_l2(port, ref) -> float:
    """‖port − ref‖ / ‖ref‖ (float32 differences, float64 sums)."""
    port, ref = np.asarray(port, np.float32), np.asarray(ref, np.float32)
    norm = _norm(ref)
    return _norm(port - ref) / norm if norm else float(np.abs(port).max())


@dataclasses.dataclass(frozen=True)
class StateMetrics:
    max_abs: float
    mean_abs: float
    rel_l2: float
    cosine: float
    scaled: float  # the scale-aware error above


def state_metrics(port, ref) -> StateMetrics:
    """max |Δ|, mean |Δ|, relative L2, cosine similarity and scaled error of two tensors."""
    port, ref = np.asarray(port, np.float32), np.asarray(ref, np.float32)
    delta = np.abs(port - ref)
    denom = _norm(port) * _norm(ref)
    return StateMetrics(
        max_abs=float(delta.max()) if delta.size else 0.0,
        mean_abs=float(delta.mean(dtype=np.float64)) if delta.size else 0.0,
        rel_l2=relative_l2(port, ref),
        cosine=float(np.sum(port * ref, dtype=np.float64) / denom) if denom else 1.0,
        scaled=scaled_error(port, ref),
    )


def log_softmax(x: np.ndarray) -> np.ndarray:
    """float64 log-probabilities (KL between fp32 runs is ~1e-12: float32 would hide it)."""
    x = _f64(x)
    x -= x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _top5(logits: np.ndarray) -> np.ndarray:
    """Indices of the 5 largest logits of each row (torch.topk: a selection, not a sort)."""
    return torch.from_numpy(np.ascontiguousarray(logits)).topk(5, dim=-1).indices.numpy()


@dataclasses.dataclass(frozen=True)
class LogitMetrics:
    tokens: int
    kl_mean: float
    kl_median: float
    kl_p90: float
    kl_p99: float
    kl_p99_9: float
    kl_max: float
    kl_argmax_position: int
    same_top1: float
    same_top1_sigma: float
    top5_overlap: float
    delta_p_ref_top_mean_abs: float
    delta_p_ref_top_max_abs: float
    max_abs_logit_diff: float
    rel_l2: float


def logit_metrics(port_logits, ref_logits) -> LogitMetrics:
    """KL percentiles, same top-1 (± binomial σ), top-5 overlap, Δp of the reference's top
    token, max |Δlogit| — per token over all positions."""
    port_logits = np.asarray(port_logits, np.float32)
    ref_logits = np.asarray(ref_logits, np.float32)
    ref_logp, port_logp = log_softmax(ref_logits), log_softmax(port_logits)
    ref_p = np.exp(ref_logp)
    port_logp -= ref_logp
    kl = -np.einsum("ij,ij->i", ref_p, port_logp)
    port_logp += ref_logp
    n = len(kl)
    ref_top = np.argmax(ref_logits, -1)
    same = float(np.mean(np.argmax(port_logits, -1) == ref_top))
    top5_ref = _top5(ref_logits)
    top5_port = _top5(port_logits)
    overlap = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(top5_ref, top5_port, strict=True)])
    rows = np.arange(n)
    delta_p = np.exp(port_logp[rows, ref_top]) - ref_p[rows, ref_top]
    delta = port_logits - ref_logits  # exact in float32 for nearby values
    return LogitMetrics(
        tokens=n,
        kl_mean=float(kl.mean()),
        kl_median=float(np.median(kl)),
        kl_p90=float(np.percentile(kl, 90)),
        kl_p99=float(np.percentile(kl, 99)),
        kl_p99_9=float(np.percentile(kl, 99.9)),
        kl_max=float(kl.max()),
        kl_argmax_position=int(np.nanargmax(kl)) if np.isfinite(kl).any() else 0,
        same_top1=same,
        same_top1_sigma=float(np.sqrt(same * (1 - same) / n)),
        top5_overlap=float(overlap),
        delta_p_ref_top_mean_abs=float(np.abs(delta_p).mean()),
        delta_p_ref_top_max_abs=float(np.abs(delta_p).max()),
        max_abs_logit_diff=float(np.abs(delta).max()),
        rel_l2=relative_l2(port_logits, ref_logits),
    )
