"""Benchmark mistral-convert against `cp` of the same source file on the same disk.

Builds a synthetic 7B-shaped checkpoint (bf16 consolidated.00.pth; `--n-layers` for a cut-down
one), then alternates `cp SRC/consolidated.00.pth` and `mistral-convert SRC OUT` `--repeat`
times, each as a child process, recording wall time and the child's peak RSS (wait4). Prints a
table; `--json FILE` writes every figure. Page cache: `--drop-caches` (root) empties it before
each run so both start cold; otherwise both read a warm source.

    python benchmarks/convert_bench.py --n-layers 4 --repeat 3
    python benchmarks/convert_bench.py --repeat 2 --drop-caches --json bench.json   # full 7B
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from tabulate import tabulate

from checkpoint.presets import preset

BIN = Path(sys.executable).parent


def run(cmd: list[str], drop_caches: bool) -> dict:
    if drop_caches:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    start = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{cmd[0]} failed with status {status}")
    return {"seconds": wall, "peak_rss_mb": usage.ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-layers", type=int, default=None, help="blocks (default: all 32)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("bench-work"))
    parser.add_argument("--drop-caches", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic source")
    parser.add_argument("--json", type=Path, help="write the figures here")
    opts = parser.parse_args()

    args = preset("7b-v0.1", n_layers=opts.n_layers)
    src, copy_dst, out = (opts.workdir / n for n in ("src", "cp-dst.pth", "converted"))
    if not (src / "consolidated.00.pth").exists():
        print(f"writing synthetic checkpoint ({args.n_layers} layers) to {src} ...")
        # In a child: this process stays small, so its children's peak RSS (which starts from
        # the forking parent's) measures them, not us.
        n_layers = ["--n-layers", str(opts.n_layers)] if opts.n_layers else []
        subprocess.run(
            [str(BIN / "mistral-tiny"), str(src), "--preset", "7b-v0.1", *n_layers],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    size = (src / "consolidated.00.pth").stat().st_size

    rows = []
    for i in range(opts.repeat):
        copy_dst.unlink(missing_ok=True)
        shutil.rmtree(out, ignore_errors=True)
        os.sync()
        cp = run(["cp", str(src / "consolidated.00.pth"), str(copy_dst)], opts.drop_caches)
        copy_dst.unlink()
        os.sync()
        conv = run([str(BIN / "mistral-convert"), str(src), str(out)], opts.drop_caches)
        rows.append(
            {
                "run": i + 1,
                "cp_s": cp["seconds"],
                "convert_s": conv["seconds"],
                "ratio": conv["seconds"] / cp["seconds"],
                "convert_peak_rss_mb": conv["peak_rss_mb"],
                "cp_peak_rss_mb": cp["peak_rss_mb"],
            }
        )
        shutil.rmtree(out)
    if not opts.keep:
        shutil.rmtree(src)

    print(f"source: {size / 1e9:.2f} GB, {args.n_layers} layers, drop caches: {opts.drop_caches}")
    print(tabulate(rows, headers="keys", floatfmt=".2f", tablefmt="github"))
    median = statistics.median(r["ratio"] for r in rows)
    peak = max(r["convert_peak_rss_mb"] for r in rows)
    print(f"median convert/cp: {median:.2f} (target ≤ 1.25); peak RSS {peak:.0f} MB (target ≤ 512)")
    if opts.json:
        opts.json.write_text(
            json.dumps(
                {
                    "source_bytes": size,
                    "n_layers": args.n_layers,
                    "drop_caches": opts.drop_caches,
                    "machine": platform.platform(),
                    "cpus": os.cpu_count(),
                    "runs": rows,
                    "median_ratio": median,
                    "peak_rss_mb": peak,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
