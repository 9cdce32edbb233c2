"""Benchmark mistral-convert against `cp` of the same source file on the same disk.

Builds a synthetic 7B-shaped checkpoint (bf16 consolidated.00.pth; `--n-layers` for a cut-down
one), then alternates `cp SRC/consolidated.00.pth` and `mistral-convert SRC OUT` `--repeat`
times, each as a child process, recording wall time and the child's peak RSS (wait4). Prints a
table; `--json FILE` writes every figure. Page cache: `--drop-caches` (root) empties it before
each run so both start cold; otherwise both read a warm source.

    python benchmarks/convert_bench.py --n-layers 4 --repeat 3
    python benchmarks/convert_bench.py --repeat 2 --drop-caches --json bench.json   # full 7B

`--fp8-layer` benchmarks the 2025–26 FP8 format instead: a synthetic Ministral-3-14B-width
checkpoint (dim 5120, hidden 16384, 32 heads, 8 KV heads, head_dim 128, vocab 131072; every
linear FP8 with per-tensor weight and activation scales, embeddings, head and norms bf16;
yarn, llama_4_scaling, quantization in params.json) of `--n-layers` blocks (default 1) in one
consolidated.safetensors, written tensor by tensor in bounded memory. Each repeat times `cp`,
`mistral-convert` (keep: byte copy, every FP8 byte NaN-checked), the same without the NaN check
(to measure it), and `mistral-convert --dtype bfloat16` (FP8 dequantized).

    python benchmarks/convert_bench.py --fp8-layer --repeat 3 --json fp8.json

`--fp8-layer large-3` does the same for Mistral Large 3's format: one full-width MoE layer
(dim 7168, latent attention, 128 routed experts of width 4096 + a shared one; 11.6 GB of FP8)
with compressed-tensors block FP8 (`weight_scale` per 128×128 block, bf16; `wq_a`,
`wkv_a_with_mqa`, the router, embeddings and head unquantized, as the release ships).

    python benchmarks/convert_bench.py --fp8-layer large-3 --repeat 1 --json large3.json
"""

import argparse
import dataclasses
import hashlib
import json
import multiprocessing
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np
from tabulate import tabulate

from checkpoint.args import ModelArgs
from checkpoint.folder import SAFETENSORS_NAME
from checkpoint.presets import preset
from checkpoint.sections import BlockFP8Args, Llama4ScalingArgs, QuantizationArgs, YarnArgs
from checkpoint.spec import block_grid, tensor_spec
from checkpoint.tiny import block_fp8_config, copy_tokenizer, init_distribution
from convert.safetensors_header import header_bytes

BIN = Path(sys.executable).parent
# Ministral-3-14B's text shape (notes §1.1: dim 5120, 40 layers, 32/8 heads, head_dim 128; the
# hidden size is not published, 16384 assumed) and its 2025–26 sections.
MINISTRAL_3_14B = ModelArgs(
    dim=5120,
    n_layers=40,
    head_dim=128,
    hidden_dim=16384,
    n_heads=32,
    n_kv_heads=8,
    norm_eps=1e-5,
    vocab_size=131072,
    rope_theta=1e6,
    max_position_embeddings=262144,
    yarn=YarnArgs(16.0, 16384, beta=32.0, alpha=1.0, apply_scale=False),
    llama_4_scaling=Llama4ScalingArgs(16384, 0.1),
    quantization=QuantizationArgs("fp8_e4m3", "TENSOR"),
)
# Large 3's first layer (dense: MLA and a 16384-wide FFN), block FP8 as it ships.
LARGE_3_DENSE_LAYER = dataclasses.replace(
    preset("large-3-675b", n_layers=1),
    quantization_config=BlockFP8Args(**block_fp8_config((128, 128))),
)
# One routed layer of Large 3 (the release's first 3 are dense).
LARGE_3_LAYER = dataclasses.replace(
    LARGE_3_DENSE_LAYER,
    moe=dataclasses.replace(LARGE_3_DENSE_LAYER.moe, first_k_dense_replace=0),
)
FP8_LAYERS = {
    "ministral-3-14b": MINISTRAL_3_14B,
    "large-3": LARGE_3_LAYER,
    "large-3-dense": LARGE_3_DENSE_LAYER,
}
# Linears a block-FP8 release leaves unquantized (Large 3: the latent projections' first
# halves, fused in serving, and the router).
BLOCK_FP8_UNQUANTIZED = ("wq_a", "wkv_a_with_mqa", ".gate.")
FP8_BLOCK = 16 * 2**20  # random values reused across tensors (bounded memory)
# A keep-mode conversion with the per-byte FP8 NaN check turned off, to measure what it costs.
NO_NAN_CHECK = (
    "import sys; import convert.convert as c; c.CHECK_FP8_BYTES = False; "
    "from convert.cli import main; main(sys.argv[1:])"
)


def write_fp8_checkpoint(folder: Path, args: ModelArgs, seed: int = 0) -> Path:
    """params.json, one consolidated.safetensors (linears FP8 + f32 scales [1], or bf16 block
    scales with `quantization_config`; the rest bf16) and tekken.json; tensor bytes copied from
    reused random blocks, never the model in memory."""
    folder.mkdir(parents=True, exist_ok=True)
    args.to_json(folder / "params.json")
    rng = np.random.default_rng(seed)
    spec = tensor_spec(args)
    linears = fp8_linears(args)
    entries, sources = [], {}
    for name, shape in spec.items():
        count = int(np.prod(shape))
        if name in linears:
            base = name.removesuffix(".weight")
            entries.append((name, "F8_E4M3", shape, count))
            sources[name] = "fp8"
            value = 4 / shape[1] ** 0.5 / 448.0
            if args.fp8_block:
                grid = block_grid(shape, args.fp8_block)
                entries.append((f"{base}.weight_scale", "BF16", grid, 2 * int(np.prod(grid))))
                scales = np.full(grid, value, np.float32).astype(ml_dtypes.bfloat16)
                sources[f"{base}.weight_scale"] = scales.view(np.uint8)
                continue
            entries.append((f"{base}.qscale_weight", "F32", (1,), 4))
            entries.append((f"{base}.qscale_act", "F32", (1,), 4))
            sources[f"{base}.qscale_weight"] = np.float32([value]).view(np.uint8)
            sources[f"{base}.qscale_act"] = np.float32([0.05]).view(np.uint8)
        else:
            entries.append((name, "BF16", shape, count * 2))
            sources[name] = init_distribution(name, shape)
    blocks: dict = {}

    def block(kind) -> np.ndarray:
        if kind not in blocks:
            if kind == "fp8":  # N(0, 1)·100 as e4m3fn: no NaN byte (saturated to ±448 first)
                values = np.clip(rng.standard_normal(FP8_BLOCK, dtype=np.float32) * 100, -448, 448)
                blocks[kind] = values.astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
            else:
                mean, std = kind
                values = rng.standard_normal(FP8_BLOCK // 2, dtype=np.float32) * std + mean
                blocks[kind] = values.astype(ml_dtypes.bfloat16).view(np.uint8)
        return blocks[kind]

    with open(folder / SAFETENSORS_NAME, "wb") as f:
        f.write(header_bytes(entries, {"format": "pt"}))
        for name, _, _, nbytes in entries:
            source = sources[name]
            if isinstance(source, np.ndarray):
                f.write(source.tobytes())
                continue
            data = block(source)
            start = int(rng.integers(0, len(data) // 2)) * 2
            remaining = nbytes
            while remaining:
                piece = data[start : start + remaining]
                f.write(piece.data)
                remaining -= len(piece)
                start = 0
    copy_tokenizer(folder, args.vocab_size)
    return folder


def fp8_linears(args: ModelArgs) -> list[str]:
    """The linears a synthetic FP8 checkpoint stores in FP8: every block's, less those a
    block-FP8 release leaves unquantized."""
    skip = BLOCK_FP8_UNQUANTIZED if args.fp8_block else ()
    return [
        n
        for n, s in tensor_spec(args).items()
        if n.startswith("layers.") and len(s) == 2 and not any(k in n for k in skip)
    ]


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
    cpu = usage.ru_utime + usage.ru_stime  # both threads; steadier than wall on a busy host
    return {"seconds": wall, "cpu_seconds": cpu, "peak_rss_mb": usage.ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-layers", type=int, default=None, help="blocks (default: all 32)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("bench-work"))
    parser.add_argument("--drop-caches", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic source")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument(
        "--fp8-layer",
        nargs="?",
        const="ministral-3-14b",
        choices=list(FP8_LAYERS),
        help="an FP8 checkpoint of this width (--n-layers blocks, default 1; ministral-3-14b "
        "when no width is given); keep, keep without the NaN check, and --dtype bfloat16 "
        "against cp",
    )
    opts = parser.parse_args()
    if opts.fp8_layer:
        fp8_main(opts)
        return

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


def kernel_rates(rows: int = 4096, cols: int = 16384, repeat: int = 5) -> dict:
    """In-process single-thread rates (best of `repeat`, CPU time, so steady on a busy host) of
    what the FP8 paths add per byte, next to the SHA-256 every written byte goes through."""
    from checkpoint.tensors import TensorRecord
    from convert import fp8

    rng = np.random.default_rng(0)
    values = np.clip(rng.standard_normal((rows, cols), dtype=np.float32) * 100, -448, 448)
    raw = values.astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    out = np.empty((rows, cols), ml_dtypes.bfloat16)
    scale = np.float32([[0.01]])
    record = TensorRecord("w", Path("-"), "F8_E4M3", (rows, cols), 0)

    def best(work) -> float:
        times = []
        for _ in range(repeat):
            start = time.process_time()
            work()
            times.append(time.process_time() - start)
        return min(times)

    nbytes = raw.nbytes
    return {
        "fp8_bytes": nbytes,
        "sha256_GBps": nbytes / best(lambda: hashlib.sha256(raw).digest()) / 1e9,
        "nan_check_GBps": nbytes / best(lambda: fp8.first_nan(raw)) / 1e9,
        "dequantize_to_bf16_Gelem_per_s": nbytes
        / best(lambda: fp8.dequantize_into(raw, scale, out, record))
        / 1e9,
    }


def fp8_main(opts) -> None:
    """The FP8 benchmark: cp vs keep, keep without the NaN check, and --dtype bfloat16."""
    n_layers = opts.n_layers or 1
    args = dataclasses.replace(FP8_LAYERS[opts.fp8_layer], n_layers=n_layers)
    src, copy_dst, out = (opts.workdir / n for n in ("fp8-src", "cp-dst", "converted"))
    weights = src / SAFETENSORS_NAME
    if not weights.exists():
        print(f"writing synthetic FP8 checkpoint ({n_layers} layer(s)) to {src} ...")
        # In a child, as above: this process stays small.
        child = multiprocessing.get_context("spawn").Process(
            target=write_fp8_checkpoint, args=(src, args)
        )
        child.start()
        child.join()
        if child.exitcode != 0:
            raise SystemExit("writing the synthetic FP8 checkpoint failed")
    size = weights.stat().st_size
    spec = tensor_spec(args)
    fp8_bytes = sum(int(np.prod(spec[n])) for n in fp8_linears(args))
    modes = {
        "keep": [str(BIN / "mistral-convert"), str(src), str(out)],
        "keep_no_nan_check": [sys.executable, "-c", NO_NAN_CHECK, str(src), str(out)],
        "bfloat16": [str(BIN / "mistral-convert"), str(src), str(out), "--dtype", "bfloat16"],
    }
    rows = []
    for i in range(opts.repeat):
        copy_dst.unlink(missing_ok=True)
        os.sync()
        cp = run(["cp", str(weights), str(copy_dst)], opts.drop_caches)
        copy_dst.unlink()
        row = {"run": i + 1, "cp_s": cp["seconds"], "cp_cpu_s": cp["cpu_seconds"]}
        for mode, cmd in modes.items():
            shutil.rmtree(out, ignore_errors=True)
            os.sync()
            conv = run(cmd, opts.drop_caches)
            written = sum(p.stat().st_size for p in out.glob("model-*.safetensors"))
            shutil.rmtree(out)
            row |= {
                f"{mode}_s": conv["seconds"],
                f"{mode}_cpu_s": conv["cpu_seconds"],
                f"{mode}_ratio": conv["seconds"] / cp["seconds"],
                f"{mode}_GBps": size / conv["seconds"] / 1e9,
                f"{mode}_rss_mb": conv["peak_rss_mb"],
                f"{mode}_out_GB": written / 1e9,
            }
        rows.append(row)
    if not opts.keep:
        shutil.rmtree(src)

    print(
        f"source: {size / 1e9:.2f} GB ({fp8_bytes / 1e9:.2f} GB FP8 linears, the rest bf16), "
        f"{n_layers} layer(s), drop caches: {opts.drop_caches}"
    )
    print(tabulate(rows, headers="keys", floatfmt=".2f", tablefmt="github"))
    summary = {
        mode: {
            "median_s": statistics.median(r[f"{mode}_s"] for r in rows),
            "median_cpu_s": statistics.median(r[f"{mode}_cpu_s"] for r in rows),
            "median_ratio_vs_cp": statistics.median(r[f"{mode}_ratio"] for r in rows),
            "median_GBps": statistics.median(r[f"{mode}_GBps"] for r in rows),
            "peak_rss_mb": max(r[f"{mode}_rss_mb"] for r in rows),
        }
        for mode in modes
    }
    summary["cp"] = {
        "median_s": statistics.median(r["cp_s"] for r in rows),
        "median_cpu_s": statistics.median(r["cp_cpu_s"] for r in rows),
    }
    # What the FP8 part alone costs: the extra time over the byte copy, per FP8 byte.
    extra = summary["bfloat16"]["median_s"] - summary["keep"]["median_s"]
    check = summary["keep"]["median_s"] - summary["keep_no_nan_check"]["median_s"]
    summary["dequantize_extra_s"] = extra
    summary["nan_check_extra_s"] = check
    summary["dequantize_extra_cpu_s"] = (
        summary["bfloat16"]["median_cpu_s"] - summary["keep"]["median_cpu_s"]
    )
    summary["nan_check_extra_cpu_s"] = (
        summary["keep"]["median_cpu_s"] - summary["keep_no_nan_check"]["median_cpu_s"]
    )
    summary["kernels"] = kernel_rates()
    for mode, figures in summary.items():
        print(mode, figures)
    if opts.json:
        opts.json.write_text(
            json.dumps(
                {
                    "benchmark": f"fp8-layer {opts.fp8_layer}",
                    "args": args.to_dict(),
                    "source_bytes": size,
                    "fp8_bytes": fp8_bytes,
                    "n_layers": n_layers,
                    "drop_caches": opts.drop_caches,
                    "machine": platform.platform(),
                    "cpus": os.cpu_count(),
                    "runs": rows,
                    "summary": summary,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
