"""The one prepared GPU check (`make gpu-check OUT=DIR`): on the device machine, in one go,

1. the test suite with the GPU visible (`pytest -m "not slow"`),
2. a 7B-shaped random checkpoint built there (`mistral-tiny --preset`, not shipped),
3. converted (`mistral-convert`), then verified streamed and whole (`mistral-verify --json`),
   each with wall time, peak host RSS and each framework's peak GPU memory,
4. bf16 decode at batch 1 and 8, JAX next to the torch reference, against the HBM roofline
   (`benchmarks/generate_bench.py`).

Everything lands in OUT (logs, reports, `gpu-check.json`) and a table is printed. A CPU dry run
with a cut preset: `python benchmarks/gpu_check.py OUT --n-layers 1 --skip-tests`.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from tabulate import tabulate

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]


def step(name: str, command: list, out: Path, timeout: float) -> dict:
    """Run `command`, its output to OUT/NAME.log; wall time, exit code, peak child RSS."""
    start = time.perf_counter()
    with open(out / f"{name}.log", "w") as log:
        try:
            rc = subprocess.run(
                [str(c) for c in command], stdout=log, stderr=subprocess.STDOUT, timeout=timeout
            ).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    peak_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    row = {"step": name, "rc": rc, "seconds": round(time.perf_counter() - start, 1)}
    row["peak_rss_gb_so_far"] = round(peak_rss / 1e9, 2)
    print(row, flush=True)
    return row


def verify_row(row: dict, report_dir: Path) -> dict:
    """The verdict and peak GPU memory from a verify run's report.json."""
    try:
        report = json.loads((report_dir / "report.json").read_text())
    except (OSError, ValueError):
        return row
    env = report["environment"]
    return row | {
        "verdict": report["verdict"],
        "torch_peak_gpu_gb": (env.get("torch_peak_gpu_bytes") or 0) / 1e9 or None,
        "jax_peak_gpu_gb": (env.get("jax_peak_gpu_bytes") or 0) / 1e9 or None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--preset", default="7b-v0.1")
    parser.add_argument("--n-layers", type=int, help="cut the preset (CPU dry run)")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--new-tokens", type=int, default=64)
    opts = parser.parse_args()
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU
    out = opts.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"  # the checkpoints: large, removed at the end
    rows = []

    if not opts.skip_tests:
        rows.append(
            step("tests", [BIN / "pytest", "-q", "-m", "not slow", ROOT / "tests"], out, 240)
        )
    cut = ["--n-layers", opts.n_layers] if opts.n_layers else []
    source, converted = work / "source", work / "converted"
    tiny = [BIN / "mistral-tiny", source, "--preset", opts.preset, *cut]
    rows.append(step("build", tiny, out, 300))
    rows.append(step("convert", [BIN / "mistral-convert", source, converted, "--json"], out, 300))
    for mode in ("stream", "whole"):
        report_dir = out / f"verify-{mode}"
        command = [BIN / "mistral-verify", "--reference", source, "--converted", converted]
        command += ["--report-dir", report_dir, "--json"]
        command += ["--stream-layers"] if mode == "stream" else []
        rows.append(verify_row(step(f"verify-{mode}", command, out, 300), report_dir))
    decode = []
    for batch in (1, 8):
        path = out / f"decode-batch{batch}.json"
        bench = [sys.executable, ROOT / "benchmarks" / "generate_bench.py", "--folder", converted]
        bench += ["--dtype", "bfloat16", "--batch", batch, "--new-tokens", opts.new_tokens]
        bench += ["--prompt-len", 128, "--json", path]
        rows.append(step(f"decode-batch{batch}", bench, out, 300))
        if path.exists():
            decode += json.loads(path.read_text())["rows"]
    subprocess.run(["rm", "-rf", str(work)], check=False)

    print(tabulate(rows, headers="keys", tablefmt="github"))
    print(tabulate(decode, headers="keys", floatfmt=".3g", tablefmt="github"))
    result = {"preset": opts.preset, "n_layers": opts.n_layers, "steps": rows, "decode": decode}
    result["env"] = {k: v for k, v in os.environ.items() if k.startswith(("XLA_", "CUDA_"))}
    (out / "gpu-check.json").write_text(json.dumps(result, indent=2))
    sys.exit(0 if all(r["rc"] == 0 for r in rows) else 1)


if __name__ == "__main__":
    main()
