"""Peak memory and time of `mistral-verify` on a synthetic full-size (7B-shaped) checkpoint.

Writes the synthetic official folder and converts it (each in a child process), then runs
`mistral-verify --stream-layers` on one short prompt as a child and records its wall time and
peak RSS (wait4). Prints a table; `--json FILE` writes the figures.

    python benchmarks/verify_bench.py                      # 7B, CPU: fits 24 GB of RAM?
    python benchmarks/verify_bench.py --n-layers 2 --keep
    python benchmarks/verify_bench.py --builtin-prompts --keep   # verify's own prompt set
    python benchmarks/verify_bench.py --fp8-layer large-3 --vocab-size 32768 --keep
    python benchmarks/verify_bench.py --fp8-layer large-3-dense --keep

`--fp8-layer large-3`: one full-width Mistral Large 3 MoE layer in its release format (block
FP8, 128 routed experts; `convert_bench.py`), streamed within the layer; `--vocab-size` cuts
the vocabulary. `large-3-dense`: its first layer (dense) with the whole 131072-entry
vocabulary, whose float64 head alone would be 7.5 GB: streamed, read in slices
(`verify/vocab.py`).
"""

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).parent))
from convert_bench import FP8_LAYERS, write_fp8_checkpoint

BIN = Path(sys.executable).parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="7b-v0.1")
    parser.add_argument("--n-layers", type=int)
    parser.add_argument("--workdir", type=Path, default=Path("bench-work"))
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument(
        "--builtin-prompts", action="store_true", help="verify's built-in prompt set instead"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--no-stream", action="store_true", help="load whole models instead")
    parser.add_argument("--fp8-layer", choices=sorted(FP8_LAYERS), help="one FP8 layer instead")
    parser.add_argument("--vocab-size", type=int, help="with --fp8-layer: this vocabulary")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--json", type=Path)
    opts = parser.parse_args()

    src, out = opts.workdir / "verify-src", opts.workdir / "verify-converted"
    layers = ["--n-layers", str(opts.n_layers)] if opts.n_layers else []
    if opts.fp8_layer and not src.exists():
        args = FP8_LAYERS[opts.fp8_layer]
        if opts.vocab_size:
            args = dataclasses.replace(args, vocab_size=opts.vocab_size)
        write_fp8_checkpoint(src, args)
    elif not src.exists():
        subprocess.run(
            [BIN / "mistral-tiny", src, "--preset", opts.preset, *layers],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    if not out.exists():
        subprocess.run([BIN / "mistral-convert", src, out], check=True, stdout=subprocess.DEVNULL)
    prompts = opts.workdir / "prompt.txt"
    prompts.write_text(opts.prompt + "\n")
    given = [] if opts.builtin_prompts else ["--prompts", str(prompts)]
    cmd = [
        str(BIN / "mistral-verify"),
        "--reference",
        str(src),
        "--converted",
        str(out),
        *given,
        "--device",
        opts.device,
        "--dtype",
        opts.dtype,
        "--report-dir",
        str(opts.workdir / "verify-report"),
        "--max-new-tokens",
        "8",
    ]
    if not opts.no_stream:
        cmd.append("--stream-layers")
    start = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    report = json.loads((opts.workdir / "verify-report" / "report.json").read_text())
    row = {
        "preset": f"{opts.fp8_layer} (one layer)" if opts.fp8_layer else opts.preset,
        "n_layers": report["model_args"]["n_layers"],
        "stream_layers": not opts.no_stream,
        "device": opts.device,
        "dtype": opts.dtype,
        "prompts": "built-in" if opts.builtin_prompts else 1,
        "prompt_tokens": sum(p["tokens"] for p in report["prompts"]),
        "vocab_size": report["model_args"]["vocab_size"],
        "weights_gb": sum(f.stat().st_size for f in src.glob("consolidated*")) / 1e9,
        "verdict": report["verdict"],
        "exit_code": os.waitstatus_to_exitcode(status),
        "seconds": wall,
        "peak_rss_gb": usage.ru_maxrss / 2**20,
    }
    print(tabulate([row], headers="keys", floatfmt=".2f", tablefmt="github"))
    if opts.json:
        opts.json.write_text(
            json.dumps(row | {"machine": platform.platform(), "report": report}, indent=2)
        )
    if not opts.keep:
        shutil.rmtree(opts.workdir / "verify-src")
        shutil.rmtree(opts.workdir / "verify-converted")


if __name__ == "__main__":
    main()
