"""Comparison metrics between a port's tensor and the truth (DESIGN.md §5), on numpy arrays.

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
    """Running sums of scaled squared errors of x against a truth (a mutable accumulator).

    Non-finite values of x where the truth is finite are counted and make the error infinite.
    """

    squares: float = 0.0
    count: int = 0
    nonfinite: int = 0

    def add(self, x, truth, scale: np.ndarray | None = None) -> None:
        """Add x's errors; `scale`: `error_scale(truth)`, when already computed.

        float32 throughout (x − truth of two float32 values within a factor 2 is exact; the
        rest is a yardstick), accumulated in float64."""
        x, truth = np.asarray(x, np.float32), np.asarray(truth, np.float32)
        bad = ~np.isfinite(x)
        self.nonfinite += int(bad.sum())
        self.count += x.size
        if bad.any():
            self.squares = float("inf")
        else:
            scaled = (x - truth) / (error_scale(truth) if scale is None else scale)
            self.squares += float(np.sum(np.square(scaled), dtype=np.float64))

    def __iadd__(self, other: "ErrorSums") -> "ErrorSums":
        self.squares += other.squares
        self.count += other.count
        self.nonfinite += other.nonfinite
        return self

    @property
    def rms(self) -> float:
        """RMS scaled error (inf if x was non-finite anywhere)."""
        return float(np.sqrt(self.squares / self.count)) if self.count else 0.0


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
