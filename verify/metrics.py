"""Comparison metrics between a reference tensor and a port's (DESIGN.md §5), numpy only."""

import numpy as np


def _f64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def relative_l2(port, ref) -> float:
    """‖port − ref‖ / ‖ref‖."""
    port, ref = _f64(port), _f64(ref)
    return float(np.linalg.norm(port - ref) / np.linalg.norm(ref))


def max_abs_diff(port, ref) -> float:
    return float(np.abs(_f64(port) - _f64(ref)).max())


def top1_agreement(port_logits, ref_logits) -> float:
    """Fraction of positions where both pick the same most likely token."""
    return float(np.mean(np.argmax(port_logits, -1) == np.argmax(ref_logits, -1)))


def kl_divergence(ref_logits, port_logits) -> np.ndarray:
    """Per-position KL(P_ref ‖ P_port) in nats."""
    ref_logp = _log_softmax(_f64(ref_logits))
    port_logp = _log_softmax(_f64(port_logits))
    return np.sum(np.exp(ref_logp) * (ref_logp - port_logp), axis=-1)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))
