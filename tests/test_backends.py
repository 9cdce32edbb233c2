"""The fp32 backends' accuracy factor (verify/backends.py) and the free-running fp32 limit it
scales."""

import jax

from verify.backends import backend_note, fp32_matmul_factor, scaled_fp32
from verify.gates import Thresholds
from verify.metrics import TokenRatio


def test_the_factor_is_measured_deterministically_and_never_tightens():
    device = jax.devices()[0]
    first = fp32_matmul_factor(512, "cpu", device)
    assert first == fp32_matmul_factor(512, "cpu", device) and first >= 1.0


def test_the_free_running_fp32_limit_scales_with_it_and_the_report_says_so():
    ratio = TokenRatio(1.0, 4.0, 0.1)
    base = Thresholds()
    scaled = scaled_fp32(base, 3.0)
    assert scaled.fp32_limit(ratio) == 3.0 * base.fp32_limit(ratio)
    assert scaled.teacher_forced_fp32_error == base.teacher_forced_fp32_error  # only free fp32
    assert "× 3.00" in backend_note(3.0, 14336)[0] and backend_note(1.0, 64) == []
