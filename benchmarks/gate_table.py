"""The clean-vs-fault table behind verify's gates (docs/verification.md, "Calibration"), from
tests/gate_cases.py.

For each case: the verdict, the blocks that failed, and the statistic that decides it, as a
margin — the statistic ÷ its gate, so 1 is the gate (`verify/gates.py`): the worst teacher-forced
bf16 ratio ÷ its limit (pooled or on any prompt) or fp32 error ÷ 1e-5, in the faulty blocks
(the weakest of them) and in the others; the free-running fp32 ratio against float64 at the
logits; generation: the port's disagreements, the reference's own, and what is allowed.

    python benchmarks/gate_table.py [--json benchmarks/results/gate-table.json] [--configs a,b]
"""

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from gate_cases import CONFIGS, cases, prompts, run_case, write_source


def margin(layer, dtype: str) -> float:
    """The largest statistic ÷ gate over a layer's pieces, pooled and per prompt (NaN: inf)."""
    values = []
    for piece in layer.pieces:
        if dtype == "bfloat16" and piece.bf16_ratio is not None:
            values.append(piece.bf16_ratio / piece.bf16_limit)
            pairs = zip(piece.prompt_bf16_ratios, piece.prompt_bf16_limits, strict=True)
            values += [r / g for r, g in pairs]
        values += [e / 1e-5 for e in (piece.fp32_error, *piece.prompt_fp32_errors)]
    return max((math.inf if not v <= math.inf else v) for v in values) if values else 0.0


def row_of(case, report) -> dict:
    faulty = CONFIGS[case.config].faulty_blocks if case.fault else ()
    row = {
        "config": case.config,
        "case": case.fault or f"clean, seed {case.seed}",
        "dtype": case.dtype,
        "mode": "streamed" if case.stream else "whole",
        "verdict": report.verdict,
        "failing blocks": list(report.failing_blocks),
        "others ÷ gate": max(
            (margin(x, case.dtype) for x in report.layers if x.index not in faulty), default=0.0
        ),
    }
    if faulty:
        row["faulty (weakest) ÷ gate"] = min(
            margin(x, case.dtype) for x in report.layers if x.index in faulty
        )
    row["logits fp32 ÷ref (float64)"] = report.logits.fp32_ratio
    if report.generation is not None:
        g = report.generation
        row["generation differs / allowed"] = (
            f"{g.disagreements - g.near_ties}/{g.allowed_disagreements} of {g.tokens}"
        )
        if g.reference_fp32_top1 is not None:
            row["reference fp32 agrees"] = round(g.reference_fp32_top1, 3)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--configs", help="comma-separated subset of " + ", ".join(CONFIGS))
    opts = parser.parse_args()
    chosen = set(opts.configs.split(",")) if opts.configs else set(CONFIGS)
    rows, work, sources, prompt_list = [], Path(tempfile.mkdtemp()), {}, prompts()
    for case in (c for c in cases() if c.config in chosen):
        key = (case.config, case.seed)
        if key not in sources:
            sources[key] = write_source(*key, work / f"clean-{case.config}-{case.seed}")
        rows.append(row_of(case, run_case(case, sources[key], work / "run", prompt_list)))
        print(rows[-1], file=sys.stderr, flush=True)
    print(tabulate(rows, headers="keys", tablefmt="github", floatfmt=".3g"))
    if opts.json:
        lengths = [len(p.tokens) for p in prompt_list]
        opts.json.write_text(json.dumps({"prompt_tokens": lengths, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
