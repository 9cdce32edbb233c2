"""Comparison metrics between a reference tensor and a port's (DESIGN.md §5), numpy only."""

import numpy as np


def _f64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def relative_l2(port, ref) -> float:
    """‖port − ref‖ / ‖ref‖."""
    port, ref = _f64(port), _f64(ref)
    norm = np.linalg.norm(ref)
    return float(np.linalg.norm(port - ref) / norm) if norm else float(np.abs(port).max())


def state_metrics(port, ref) -> dict[str, float]:
    """max |Δ|, mean |Δ|, relative L2 and cosine similarity of two hidden-state tensors."""
    port, ref = _f64(port), _f64(ref)
    delta = np.abs(port - ref)
    denom = np.linalg.norm(port) * np.linalg.norm(ref)
    return {
        "max_abs": float(delta.max()),
        "mean_abs": float(delta.mean()),
        "rel_l2": relative_l2(port, ref),
        "cosine": float(np.sum(port * ref) / denom) if denom else 1.0,
    }


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = _f64(x)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def kl_divergence(ref_logits, port_logits) -> np.ndarray:
    """Per-position KL(P_ref ‖ P_port) in nats."""
    ref_logp, port_logp = log_softmax(ref_logits), log_softmax(port_logits)
    return np.sum(np.exp(ref_logp) * (ref_logp - port_logp), axis=-1)


def logit_metrics(port_logits, ref_logits) -> dict:
    """KL percentiles, same top-1 (± binomial σ), top-5 overlap, Δp of the reference's top
    token, max |Δlogit| — per token over all positions."""
    kl = kl_divergence(ref_logits, port_logits)
    n = len(kl)
    ref_top = np.argmax(ref_logits, -1)
    same = float(np.mean(np.argmax(port_logits, -1) == ref_top))
    top5_ref = np.argsort(-ref_logits, -1)[:, :5]
    top5_port = np.argsort(-port_logits, -1)[:, :5]
    overlap = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(top5_ref, top5_port, strict=True)])
    rows = np.arange(n)
    delta_p = np.exp(log_softmax(port_logits)[rows, ref_top]) - np.exp(
        log_softmax(ref_logits)[rows, ref_top]
    )
    return {
        "tokens": n,
        "kl_mean": float(kl.mean()),
        "kl_median": float(np.median(kl)),
        "kl_p90": float(np.percentile(kl, 90)),
        "kl_p99": float(np.percentile(kl, 99)),
        "kl_p99_9": float(np.percentile(kl, 99.9)),
        "kl_max": float(kl.max()),
        "kl_argmax_position": int(kl.argmax()),
        "same_top1": same,
        "same_top1_sigma": float(np.sqrt(same * (1 - same) / n)),
        "top5_overlap": float(overlap),
        "delta_p_ref_top_mean_abs": float(np.abs(delta_p).mean()),
        "delta_p_ref_top_max_abs": float(np.abs(delta_p).max()),
        "max_abs_logit_diff": float(np.abs(_f64(port_logits) - _f64(ref_logits)).max()),
        "rel_l2": relative_l2(port_logits, ref_logits),
    }
