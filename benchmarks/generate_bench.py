"""Prefill and decode throughput: the JAX model vs the torch reference, same config, same run.

Writes a random ~100M-parameter checkpoint (default config below), then for each
implementation times greedy `generate` (batch 1) with 1 new token (≈ prefill) and with
`--new-tokens` (prefill + decode); decode tokens/s = (N − 1) / (t_N − t_1). JAX compile time is
the first call's excess over the steady state, reported apart. Prints a table; `--json FILE`
writes every figure.

    python benchmarks/generate_bench.py                 # CPU, fp32, ~100M params
    python benchmarks/generate_bench.py --preset 7b-v0.1 --dtype bfloat16   # on a GPU
"""

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
from tabulate import tabulate

import model_jax
import reference_torch
from checkpoint.args import ModelArgs
from checkpoint.presets import preset
from checkpoint.synthetic import write_synthetic_checkpoint
from checkpoint.tiny import write_tiny_checkpoint

CPU_100M = ModelArgs(
    dim=768,
    n_layers=8,
    head_dim=64,
    hidden_dim=2048,
    n_heads=12,
    n_kv_heads=4,
    norm_eps=1e-5,
    vocab_size=32000,
    sliding_window=1024,
)
DTYPES = {"float32": (torch.float32, jnp.float32), "bfloat16": (torch.bfloat16, jnp.bfloat16)}
# HBM bandwidth (bytes/s) by device kind, for the decode roofline: a memory-bound decode step
# reads every weight once, so it takes at least weight bytes ÷ bandwidth.
HBM_BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12}


def hbm_bandwidth(device: jax.Device) -> float | None:
    kind = getattr(device, "device_kind", "")
    return next((bw for name, bw in HBM_BANDWIDTH.items() if name in kind), None)


def timed(fn, repeat: int) -> tuple[float, float, list[list[int]]]:
    """(first call seconds, median of the next `repeat`, result)."""
    start = time.perf_counter()
    result = fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times), result


def bench(name, run, prompt_len, new_tokens, repeat, batch) -> dict:
    """Tokens per second over the whole batch; decode = the steps after the first token."""
    first_1, prefill_s, _ = timed(lambda: run(1), repeat)
    first_n, total_s, tokens = timed(lambda: run(new_tokens), repeat)
    decode_s = total_s - prefill_s
    return {
        "impl": name,
        "batch": batch,
        "prefill_tok_s": batch * prompt_len / prefill_s,
        "decode_tok_s": batch * (new_tokens - 1) / decode_s,
        "decode_step_ms": 1e3 * decode_s / (new_tokens - 1),
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "compile_s": max(0.0, first_1 - prefill_s) + max(0.0, first_n - total_s),
        "tokens": tokens,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", help="a full-size shape instead of the ~100M CPU config")
    parser.add_argument("--n-layers", type=int)
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--folder", type=Path, help="use this checkpoint instead of writing one")
    parser.add_argument("--json", type=Path)
    opts = parser.parse_args()
    if min(opts.batch, opts.prompt_len, opts.new_tokens - 1, opts.repeat) < 1:
        parser.error("--batch, --prompt-len and --repeat must be ≥ 1, --new-tokens ≥ 2")

    with tempfile.TemporaryDirectory() as tmp:
        folder = opts.folder
        if folder is None:
            folder = Path(tmp) / "ckpt"
            if opts.preset:
                write_synthetic_checkpoint(folder, preset(opts.preset, n_layers=opts.n_layers))
            else:
                write_tiny_checkpoint(folder, CPU_100M)
        torch_dtype, jax_dtype = DTYPES[opts.dtype]
        device = "cuda" if torch.cuda.is_available() else "cpu"
        rng = np.random.default_rng(0)
        prompts = [rng.integers(3, 32000, opts.prompt_len).tolist() for _ in range(opts.batch)]
        rows = []

        port = model_jax.load_model(folder, dtype=jax_dtype)
        n_params = sum(x.size for x in jax.tree_util.tree_leaves(port))

        def run_jax(n):
            return model_jax.generate(port, prompts, max_new_tokens=n, chunk_size=opts.prompt_len)

        measure = (opts.prompt_len, opts.new_tokens, opts.repeat, opts.batch)
        rows.append(bench("jax", run_jax, *measure))
        weight_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(port))
        if not opts.skip_torch:
            ref = reference_torch.Transformer.from_folder(folder, dtype=torch_dtype, device=device)

            def run_torch(n):
                return reference_torch.generate(
                    ref, prompts, max_new_tokens=n, chunk_size=opts.prompt_len
                )

            rows.append(bench("torch", run_torch, *measure))

    bandwidth = hbm_bandwidth(jax.devices()[0])
    for row in rows:  # the fraction of the HBM roofline each decode step reaches
        roofline_ms = 1e3 * weight_bytes / bandwidth if bandwidth else None
        row["roofline_fraction"] = roofline_ms / row["decode_step_ms"] if bandwidth else None
    table = [{k: v for k, v in r.items() if k != "tokens"} for r in rows]
    print(
        f"{n_params / 1e6:.0f}M parameters, {opts.dtype}, prompt {opts.prompt_len}, "
        f"{opts.new_tokens} new tokens, batch {opts.batch}, "
        f"jax on {jax.devices()[0].platform}, torch on {device}"
    )
    print(tabulate(table, headers="keys", floatfmt=".3g", tablefmt="github"))
    result = {
        "params": n_params,
        "weight_bytes": weight_bytes,
        "dtype": opts.dtype,
        "prompt_len": opts.prompt_len,
        "new_tokens": opts.new_tokens,
        "batch": opts.batch,
        "hbm_bandwidth": bandwidth,
        "jax_device": str(getattr(jax.devices()[0], "device_kind", jax.devices()[0])),
        "torch_device": device,
        "machine": platform.platform(),
        "rows": table,
    }
    if len(rows) == 2:
        result["same_tokens"] = rows[0]["tokens"] == rows[1]["tokens"]
        result["decode_ratio_jax_over_torch"] = rows[0]["decode_tok_s"] / rows[1]["decode_tok_s"]
        result["prefill_ratio_jax_over_torch"] = rows[0]["prefill_tok_s"] / rows[1]["prefill_tok_s"]
        print(
            f"JAX/torch: prefill {result['prefill_ratio_jax_over_torch']:.2f}×, decode "
            f"{result['decode_ratio_jax_over_torch']:.2f}× (target ≥ 1.0); same greedy tokens: "
            f"{result['same_tokens']}"
        )
    if opts.json:
        opts.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
