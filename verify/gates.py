"""Pass/fail gates, each set from measured clean runs and injected faults (DESIGN.md §5).

Measured on the demo config and a no-window MHA config, seeds 0–2, the built-in prompts (689
tokens), faults injected into block 2 (tests/faults.py):

| quantity | clean runs | faults (w2 ×1.02, ffn_norm ±2 %, wk↔wv, rotary layout) |
|---|---|---|
| teacher-forced bf16 error / floor | 0.71 – 0.98 | 1.94 – 2.10, 2.72 – 2.86, 127 – 137, 28 – 41 |
| teacher-forced fp32 relative L2 | 1.2e-7 – 2.1e-7 | ≥ 7.2e-3 |
| free-running bf16 error / floor, final norm and logits | 0.91 – 0.98 | 1.19 – 1.30 (w2), ≥ 1.52 |
| generation, teacher-forced top-1 (bf16, 32 tokens × 4 prompts) | 0.945 – 1.0 | |

The per-block teacher-forced gates sit between the clean maximum and the faulty minimum with
≥1.3× margin on each side (bf16), or ≥ 40× (fp32); the end-to-end free-running ratio is a coarse
check (it misses a 2 % w2 fault half the time, which is why the block gates exist). The
generation gate catches cache and position bugs, which drop agreement towards chance; on random
weights bf16 rounding alone flips 3–5 % of top-1 choices, hence 0.85 (fp32 must agree fully).
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Thresholds:
    teacher_forced_bf16_over_floor: float = 1.3
    teacher_forced_fp32_rel_l2: float = 1e-5
    free_bf16_over_floor: float = 1.25  # at the final norm and the logits
    logits_fp32_rel_l2: float = 1e-5
    # Greedy continuation of the reference, re-scored by the port: top-1 must agree this often.
    generation_teacher_forced_top1_bf16: float = 0.85
    generation_teacher_forced_top1_fp32: float = 1.0

    @classmethod
    def parse(cls, text: str | None) -> "Thresholds":
        """'name=value,name=value' overrides; unknown names raise ValueError."""
        if not text:
            return cls()
        values = {}
        for item in text.split(","):
            name, _, value = item.partition("=")
            if name.strip() not in {f.name for f in dataclasses.fields(cls)}:
                raise ValueError(f"unknown threshold {name.strip()!r}")
            values[name.strip()] = float(value)
        return cls(**values)
