"""The clean-vs-fault table behind verify's gates (docs/verification.md, "Calibration"), from
tests/gate_cases.py.

For each case: the verdict, the blocks that failed, and the statistic that decides it: the
worst teacher-forced bf16 ratio (port error ÷ reference's own, any piece) or fp32 error, in the
faulty blocks and in the others. Clean rows also give the worst single-prompt ratio.

    python benchmarks/gate_table.py [--json benchmarks/results/gate-table.json]
"""

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from gate_cases import FAULTY_BLOCKS, cases, prompts, run_case, write_source


def worst(layers, dtype: str, per_prompt: bool = False) -> float:
    """The largest teacher-forced statistic over the layers' pieces (NaN and inf count)."""
    values = []
    for layer in layers:
        for piece in layer.pieces:
            if dtype == "bfloat16":
                values += list(piece.prompt_bf16_ratios) if per_prompt else [piece.bf16_ratio]
            else:
                values += list(piece.prompt_fp32_errors) if per_prompt else [piece.fp32_error]
    return max((math.inf if not v <= math.inf else v) for v in values) if values else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    opts = parser.parse_args()
    rows, work, sources, prompt_list = [], Path(tempfile.mkdtemp()), {}, prompts()
    for case in cases():
        key = (case.config, case.seed)
        if key not in sources:
            sources[key] = write_source(*key, work / f"clean-{case.config}-{case.seed}")
        report = run_case(case, sources[key], work / "run", prompt_list)
        faulty = [layer for layer in report.layers if layer.index in FAULTY_BLOCKS]
        others = [layer for layer in report.layers if layer.index not in FAULTY_BLOCKS]
        row = {
            "config": case.config,
            "case": case.fault or f"clean, seed {case.seed}",
            "dtype": case.dtype,
            "verdict": report.verdict,
            "failing blocks": list(report.failing_blocks),
        }
        if case.fault:
            faulty_values = [worst([layer], case.dtype) for layer in faulty]
            row |= {
                "faulty blocks (weakest)": min(faulty_values),
                "other blocks": worst(others, case.dtype),
            }
        else:
            row |= {
                "all blocks": worst(report.layers, case.dtype),
                "worst prompt": worst(report.layers, case.dtype, per_prompt=True),
            }
        rows.append(row)
        print(row, file=sys.stderr, flush=True)
    print(tabulate(rows, headers="keys", tablefmt="github", floatfmt=".3g"))
    if opts.json:
        lengths = [len(p.tokens) for p in prompt_list]
        opts.json.write_text(json.dumps({"prompt_tokens": lengths, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
