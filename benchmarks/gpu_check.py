"""The one prepared GPU check (`make gpu-check OUT=DIR`; on the lent machine, offline:
`benchmarks/device/run.sh`, see benchmarks/device/README.md). In one go, most telling first:

1. `tiny`: the trained-like tiny config (`mistral-tiny --weights trained-like`) converted and
   verified on the GPU and on the CPU: how far the bf16 teacher-forced ratios (gate 1.1,
   calibrated on CPU) move on a GPU, on weights with massive activations and attention sinks;
2. `7b`: a 7B-shaped random checkpoint built there (`mistral-tiny --preset`, not shipped),
   converted, verified streamed and whole (wall time, peak host RSS, each framework's peak
   GPU memory, verdict, bf16 ratios);
3. `decode`: bf16 decode at batch 1 and 8, JAX next to the torch reference, against the HBM
   roofline (`benchmarks/generate_bench.py`), the bandwidth also measured there;
4. `cut`: a one-block cut of the 7B shape verified on the GPU and on the CPU (the same
   comparison as 1 at full width);
5. `tests`: the test suite with the GPU visible (`pytest -m "not slow"`).

Each step is bounded by its own cap and by `--budget` (seconds for the whole check): a step
that no longer fits is recorded as skipped. CLIs run as `python -c "from convert.cli import
main; main()"` on this checkout (no installed entry points needed). Everything that matters
lands in OUT as at most 6 files, rewritten after every step (so a run killed at its limit
still returns them): gpu-check.md (summary tables), gpu-check.json (all figures),
verify-reports.json / .md (every verify run's report.json / report.md), logs.txt (every
step's output) and drift-verify-whole.png. Checkpoints go to --work (removed at the end).
A CPU dry run: `python benchmarks/gpu_check.py OUT --n-layers 1 --skip-tests --new-tokens 8
--slow 5` (each step's cap × 5).
`--summarize OUT` rewrites gpu-check.md from gpu-check.json.
"""

import argparse
import importlib.util
import json
import math
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from datetime import UTC, datetime
from pathlib import Path

from tabulate import tabulate

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
GROUPS = ("tiny", "7b", "decode", "cut", "tests")
DEFAULT_GATE = 1.1  # verify/gates.py teacher_forced_bf16_ratio, when a report does not say
# A CPU run of the same config is its GPU run's baseline for the bf16 ratios.
PAIRS = {"tiny-verify-gpu": "tiny-verify-cpu", "cut-verify-gpu": "cut-verify-cpu"}
PROBE = r"""
import json, platform, sys, time
info = {"python": platform.python_version(), "versions": {}}
for name in ("torch", "jax", "jaxlib", "numpy", "equinox", "transformers", "mistral_common",
             "pydantic"):
    try:
        info["versions"][name] = __import__(name).__version__
    except Exception as err:
        info["versions"][name] = f"unavailable: {type(err).__name__}: {err}"
import torch, jax
info["torch_cuda"] = torch.version.cuda
info["torch_gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
devices = jax.devices()
info["jax_backend"] = jax.default_backend()
info["jax_devices"] = [f"{d.platform}:{getattr(d, 'device_kind', '')}" for d in devices]
info["gpu"] = bool(info["torch_gpu"]) and any(d.platform == "gpu" for d in devices)
open(sys.argv[1], "w").write(json.dumps(info))  # what the steps need, before anything can fail
if info["torch_gpu"]:  # device-to-device copy: bytes read + written per second
    info["torch_tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        y.copy_(x)
    end.record()
    torch.cuda.synchronize()
    info["copy_bandwidth"] = 2 * 20 * x.numel() / (start.elapsed_time(end) / 1e3)
open(sys.argv[1], "w").write(json.dumps(info))
"""


def cli(name: str) -> list:
    """An entry point of pyproject.toml run on this checkout, installed or not."""
    module, func = SCRIPTS[name].split(":")
    code = f"import sys; sys.argv[0] = {name!r}; from {module} import {func}; {func}()"
    return [sys.executable, "-c", code]


# mistral-verify with each phase it starts timed on stderr (its tqdm bar is silent in a log).
VERIFY = """
import sys, time
import verify.cli as cli
sys.argv[0] = "mistral-verify"
start, bar = time.perf_counter(), getattr(cli, "VerifyProgress", None)
shown = getattr(bar, "__call__", None)
def traced(self, message):
    print(f"[verify +{time.perf_counter() - start:6.1f} s] {message}", file=sys.stderr, flush=True)
    shown(self, message)
if shown is not None:  # else untimed
    bar.__call__ = traced
cli.main()
"""


class Check:
    """Steps under a deadline; every result written to OUT as soon as it exists."""

    def __init__(self, out: Path, work: Path, budget: float | None, slow: float, meta: dict):
        self.out, self.work, self.slow = out, work, slow
        self.deadline = time.monotonic() + budget if budget else None
        self.result = meta | {"steps": [], "decode": [], "decode_runs": {}, "bf16_ratios": {}}
        self.reports: dict = {}
        self.written: set[str] = set()  # folders (re)written by this run, by step name
        self.log = out / "logs.txt"
        self.env = os.environ | {
            "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.getenv("PYTHONPATH")])])
        }

    def remaining(self) -> float:
        return math.inf if self.deadline is None else self.deadline - time.monotonic()

    def failed(self, needs) -> list[str]:
        """The steps of `needs` that have not run and passed."""
        done = {r["step"] for r in self.result["steps"] if r["rc"] == 0}
        return [n for n in needs if n not in done]

    def step(self, name: str, command: list, cap: float, needs=(), cwd=None) -> dict:
        """Run `command` (output appended to logs.txt) within min(cap, budget left)."""
        row = {"step": name}
        missing = self.failed(needs)
        timeout = min(cap * self.slow, self.remaining() - 5)
        if missing:
            row |= {"rc": "skipped", "note": f"needs {', '.join(missing)}"}
        elif timeout < 20:
            row |= {"rc": "skipped", "note": "budget"}
        else:
            with open(self.log, "a") as log:
                said = " ".join(shown_arg(c) for c in command)
                log.write(f"\n===== {name} (≤ {timeout:.0f} s): {said}\n")
                log.flush()
                start = time.perf_counter()
                # Its own process group (same session), so a timeout also ends its children
                # (pytest-xdist workers); a kill of this check still reaches them all.
                process = subprocess.Popen(
                    [str(c) for c in command],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=self.env,
                    cwd=cwd,
                    process_group=0,
                )
                try:
                    rc = process.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
                    rc = "timeout"
                row |= {"rc": rc, "seconds": round(time.perf_counter() - start, 1)}
                log.write(f"===== {name}: rc {rc}\n")
            peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
            row["peak_rss_gb_so_far"] = round(peak / 1e9, 2)
        print(row, flush=True)
        self.result["steps"].append(row)
        self.save()
        return row

    def verify(self, name: str, source: Path, converted: Path, device: str, needs, extra=()):
        report_dir = self.work / "reports" / name
        shutil.rmtree(report_dir, ignore_errors=True)
        command = [sys.executable, "-c", VERIFY, "--reference", source, "--converted", converted]
        command += ["--device", device, "--report-dir", report_dir, *extra]
        row = self.step(name, command, 300, needs)
        try:
            report = json.loads((report_dir / "report.json").read_text())
        except (OSError, ValueError):
            return
        env = report.get("environment") or {}
        row |= {
            "verdict": report.get("verdict"),
            "report_s": report.get("seconds"),
            "torch_peak_gpu_gb": gb(env.get("torch_peak_gpu_bytes")),
            "jax_peak_gpu_gb": gb(env.get("jax_peak_gpu_bytes")),
            "devices": f"torch {env.get('torch_device')}, jax {env.get('jax_device')}",
        }
        self.reports[name] = report
        self.result["bf16_ratios"][name] = piece_ratios(report)
        self.result["gates"] = self.result.get("gates", {}) | {name: gate_of(report)}
        if (report_dir / "report.md").exists():
            with open(self.out / "verify-reports.md", "a") as md:
                md.write(f"\n\n# {name}\n\n" + (report_dir / "report.md").read_text())
        if name == "verify-whole" and (report_dir / "drift.png").exists():
            shutil.copyfile(report_dir / "drift.png", self.out / "drift-verify-whole.png")
        self.save()

    def build(self, name: str, folder: Path, command: list, needs=()) -> None:
        """Write `folder` (a checkpoint or a conversion) unless an earlier run with --keep-work
        left it done by the same command, from inputs this run did not rewrite."""
        done, said = folder.with_name(folder.name + ".done"), " ".join(map(str, command))
        rewritten = self.written & set(needs)
        if done.exists() and done.read_text() == said and not rewritten and not self.failed(needs):
            self.result["steps"].append({"step": name, "rc": 0, "note": "reused from --work"})
            return
        done.unlink(missing_ok=True)
        shutil.rmtree(folder, ignore_errors=True)
        self.written.add(name)
        if self.step(name, command, 180, needs)["rc"] == 0:
            done.write_text(said)

    def save(self) -> None:
        (self.out / "gpu-check.json").write_text(json.dumps(self.result, indent=1))
        (self.out / "verify-reports.json").write_text(json.dumps(self.reports))
        (self.out / "gpu-check.md").write_text(summary(self.result))


def shown_arg(arg) -> str:
    """An argument as the log shows it: a multi-line script by its size only."""
    text = str(arg)
    return f"<script of {text.count(chr(10))} lines>" if "\n" in text.strip() else text


def gb(n) -> float | None:
    return round(n / 1e9, 2) if isinstance(n, int | float) and n else None


def gate_of(report: dict) -> float:
    value = (report.get("thresholds") or {}).get("teacher_forced_bf16_ratio")
    return value if isinstance(value, int | float) else DEFAULT_GATE


def piece_ratios(report) -> dict[str, float | None]:
    """'<block>/<piece>': bf16_ratio for every entry of a `pieces` list, wherever the report
    keeps them (walked, not addressed: the format may move); None where not finite."""
    found: dict[str, float | None] = {}

    def walk(node, where: str) -> None:
        if isinstance(node, dict):
            label = node.get("name") if isinstance(node.get("name"), str) else where
            for key, value in node.items():
                if key == "pieces" and isinstance(value, list):
                    for i, piece in enumerate(value):
                        if isinstance(piece, dict) and "bf16_ratio" in piece:
                            ratio = piece["bf16_ratio"]
                            finite = isinstance(ratio, int | float) and math.isfinite(ratio)
                            found[f"{label}/{piece.get('piece', i)}"] = ratio if finite else None
                else:
                    walk(value, f"{where}.{key}")
        elif isinstance(node, list):
            for i, item in enumerate(node):
                walk(item, f"{where}[{i}]")

    walk(report, "report")
    return found


def worst(ratios: dict) -> tuple[str | None, float | None]:
    """The piece with the highest ratio (a non-finite one counts as the worst)."""
    if not ratios:
        return None, None
    key = max(ratios, key=lambda k: math.inf if ratios[k] is None else ratios[k])
    return key, ratios[key]


def summary(result: dict) -> str:
    """gpu-check.md: steps, verdicts, peak GPU memory, bf16 ratios (GPU vs CPU), decode."""
    probe = result.get("probe") or {}
    steps = result["steps"]
    failed = [r["step"] for r in steps if r["rc"] not in (0, "skipped")]
    skipped = [r["step"] for r in steps if r["rc"] == "skipped"]
    verdicts = [r.get("verdict") for r in steps if "verdict" in r]
    head = "PASS" if not failed and not skipped and all(v == "pass" for v in verdicts) else ""
    head = head or f"{len(failed)} failed, {len(skipped)} skipped of {len(steps)} steps"
    lines = [f"# GPU check: {head}", ""]
    versions = probe.get("versions") or {}
    lines.append(
        f"{result.get('started', '')}; GPU: {probe.get('torch_gpu') or 'none'}; "
        f"torch {versions.get('torch')} (CUDA {probe.get('torch_cuda')}), "
        f"jax {versions.get('jax')} on {', '.join(probe.get('jax_devices') or ['?'])}; "
        f"Python {probe.get('python')}; preset {result.get('preset')}"
        + (f" cut to {result['n_layers']} blocks" if result.get("n_layers") else "")
        + f"; budget {result.get('budget')} s, used {result.get('seconds', '…')} s."
    )
    if not probe:
        lines += ["", "**The probe failed (logs.txt): see each verify run's devices.**"]
    elif not probe.get("gpu"):
        lines += ["", "**DRY RUN: no GPU visible to both torch and JAX; everything ran on CPU.**"]
    if probe.get("copy_bandwidth"):
        lines.append(f"Device-to-device copy: {probe['copy_bandwidth'] / 1e12:.2f} TB/s.")

    cols = ["step", "rc", "seconds", "verdict", "report_s", "torch_peak_gpu_gb"]
    cols += ["jax_peak_gpu_gb", "peak_rss_gb_so_far", "devices", "note"]
    table = [[r.get(c) for c in cols] for r in steps]
    lines += ["", "## Steps", "", tabulate(table, headers=cols, tablefmt="github")]

    ratios, gates = result.get("bf16_ratios") or {}, result.get("gates") or {}
    if ratios:
        rows = []
        for name, by_piece in ratios.items():
            piece, value = worst(by_piece)
            gate = gates.get(name, DEFAULT_GATE)
            margin = None if value is None else gate - value
            rows.append([name, len(by_piece), value, piece, gate, margin])
        lines += ["", "## bf16 teacher-forced ratios (per piece, pooled over prompts)", ""]
        lines.append("The port's bf16 error ÷ the reference's, each piece fed the reference's")
        lines.append("own bf16 input; gate calibrated on CPU. Worst piece per run:")
        head = ["run", "pieces", "max ratio", "piece", "gate", "margin"]
        lines += ["", tabulate(rows, head, tablefmt="github", floatfmt=".4g")]
        kinds = list(dict.fromkeys(k.rsplit("/", 1)[-1] for r in ratios.values() for k in r))
        by_kind = [
            [
                kind,
                *(
                    worst({k: v for k, v in r.items() if k.endswith("/" + kind)})[1]
                    for r in ratios.values()
                ),
            ]
            for kind in kinds
        ]
        lines += ["", "The worst of each piece over the blocks:", ""]
        lines.append(tabulate(by_kind, ["piece", *ratios], tablefmt="github", floatfmt=".4g"))
        moves = []
        for gpu_run, cpu_run in PAIRS.items():
            if gpu_run in ratios and cpu_run in ratios:
                a, b = ratios[gpu_run], ratios[cpu_run]
                common = [k for k in a if k in b and a[k] is not None and b[k] is not None]
                if not common:
                    continue
                key = max(common, key=lambda k: abs(a[k] - b[k]))
                high_gpu, high_cpu = worst(a)[1], worst(b)[1]
                config = gpu_run.removesuffix("-verify-gpu")
                delta = None if None in (high_gpu, high_cpu) else high_gpu - high_cpu
                moves.append([config, high_gpu, high_cpu, delta, a[key] - b[key], key, len(common)])
        if moves:
            lines += ["", "How far the ratios move from CPU to GPU (same checkpoint, same code):"]
            head = ["config", "GPU max", "CPU max", "Δ max", "largest Δ", "at", "pieces"]
            lines += ["", tabulate(moves, head, tablefmt="github", floatfmt=".4g")]

    if result.get("decode"):
        bandwidth = probe.get("copy_bandwidth")
        rows = []
        for r in result["decode"]:
            fraction = r.get("roofline_fraction")
            datasheet = r.get("hbm_bandwidth")
            measured = None
            if fraction and datasheet and bandwidth:
                measured = fraction * datasheet / bandwidth
            row = [r.get("impl"), r.get("batch"), r.get("decode_tok_s"), r.get("decode_step_ms")]
            rows.append([*row, fraction, measured, r.get("prefill_tok_s"), r.get("compile_s")])
        head = ["impl", "batch", "decode tok/s", "step ms", "roofline (datasheet)"]
        head += ["roofline (measured copy)", "prefill tok/s", "compile s"]
        lines += ["", "## Decode (bf16; roofline: weight bytes ÷ HBM bandwidth per step)", ""]
        lines.append(tabulate(rows, head, tablefmt="github", floatfmt=".3g"))
        for name, run in (result.get("decode_runs") or {}).items():
            lines.append(
                f"- {name}: {run.get('params', 0) / 1e9:.2f} B parameters, prompt "
                f"{run.get('prompt_len')}, {run.get('new_tokens')} new tokens, datasheet "
                f"bandwidth {run.get('hbm_bandwidth')}; same greedy tokens: "
                f"{run.get('same_tokens')}; JAX/torch decode "
                f"{run.get('decode_ratio_jax_over_torch') or float('nan'):.2f}×"
            )
    lines += ["", "Goals: batch-1 decode ≥ 80 % of the roofline; 7B verify ≤ 3 minutes.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--preset", default="7b-v0.1")
    parser.add_argument("--n-layers", type=int, help="cut the preset (CPU dry run)")
    parser.add_argument("--cut-layers", type=int, default=1, help="blocks of the `cut` step")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--only", help=f"comma-separated groups of {', '.join(GROUPS)}")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--budget", type=float, help="seconds for the whole check")
    parser.add_argument("--slow", type=float, default=1, help="× every step's cap (CPU: 5)")
    parser.add_argument("--work", type=Path, help="checkpoints (default: a temporary folder)")
    parser.add_argument("--keep-work", action="store_true", help="keep --work for a rerun")
    parser.add_argument("--test-workers", type=int, help="pytest-xdist -n (default 8 on a GPU)")
    parser.add_argument("--summarize", action="store_true", help="only rewrite gpu-check.md")
    opts = parser.parse_args()
    out = opts.out.resolve()
    if opts.summarize:
        result = json.loads((out / "gpu-check.json").read_text())
        (out / "gpu-check.md").write_text(summary(result))
        return
    groups = set(opts.only.split(",")) if opts.only else set(GROUPS)
    if unknown := groups - set(GROUPS):
        parser.error(f"--only: unknown {', '.join(sorted(unknown))}; groups: {', '.join(GROUPS)}")
    if opts.skip_tests:
        groups.discard("tests")
    # Two frameworks share the GPU: neither may take it whole at start-up.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    os.environ.setdefault("MPLBACKEND", "Agg")
    out.mkdir(parents=True, exist_ok=True)
    for name in ("verify-reports.md",):
        (out / name).unlink(missing_ok=True)
    work = (opts.work or Path(tempfile.gettempdir()) / "gpu-check-work").resolve()
    work.mkdir(parents=True, exist_ok=True)
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    meta = {"preset": opts.preset, "n_layers": opts.n_layers, "budget": opts.budget}
    meta |= {"slow": opts.slow} if opts.slow != 1 else {}
    meta |= {"groups": sorted(groups), "started": started, "host": platform.node()}
    check = Check(out, work, opts.budget, opts.slow, meta)
    start = time.perf_counter()

    probe_file = work / "probe.json"
    probe_file.unlink(missing_ok=True)
    check.step("probe", [sys.executable, "-c", PROBE, probe_file], 120)
    probe = json.loads(probe_file.read_text()) if probe_file.exists() else {}
    check.result["probe"] = probe
    # Without a probe (it failed: logs.txt says why), verify's own choice: the GPU if both see it.
    gpu = "gpu" if probe.get("gpu") else "cpu" if probe else "auto"

    if "tiny" in groups:
        tiny, tiny_jax = work / "tiny", work / "tiny-jax"
        check.build("tiny-build", tiny, [*cli("mistral-tiny"), tiny, "--weights", "trained-like"])
        convert = [*cli("mistral-convert"), tiny, tiny_jax]
        check.build("tiny-convert", tiny_jax, convert, ["tiny-build"])
        check.verify("tiny-verify-gpu", tiny, tiny_jax, gpu, ["tiny-convert"])
        check.verify("tiny-verify-cpu", tiny, tiny_jax, "cpu", ["tiny-convert"])

    source, converted = work / "source", work / "converted"
    if groups & {"7b", "decode"}:
        cut = ["--n-layers", opts.n_layers] if opts.n_layers else []
        check.build("build", source, [*cli("mistral-tiny"), source, "--preset", opts.preset, *cut])
        check.build("convert", converted, [*cli("mistral-convert"), source, converted], ["build"])
    if "7b" in groups:
        check.verify("verify-stream", source, converted, gpu, ["convert"], ["--stream-layers"])
        check.verify("verify-whole", source, converted, gpu, ["convert"])
    if "decode" in groups:
        for batch in (1, 8):
            path = work / f"decode-batch{batch}.json"
            path.unlink(missing_ok=True)
            bench = [sys.executable, ROOT / "benchmarks" / "generate_bench.py"]
            bench += ["--folder", converted, "--dtype", "bfloat16", "--batch", batch]
            bench += ["--new-tokens", opts.new_tokens, "--prompt-len", 128, "--json", path]
            check.step(f"decode-batch{batch}", bench, 240, ["convert"])
            if path.exists():
                run = json.loads(path.read_text())
                bandwidth = {"hbm_bandwidth": run.get("hbm_bandwidth")}
                check.result["decode"] += [row | bandwidth for row in run.get("rows", [])]
                check.result["decode_runs"][f"batch {batch}"] = {
                    k: v for k, v in run.items() if k != "rows"
                }
                check.save()

    if "cut" in groups:
        cut_src, cut_jax = work / "cut", work / "cut-jax"
        tiny_args = ["--preset", opts.preset, "--n-layers", opts.cut_layers]
        check.build("cut-build", cut_src, [*cli("mistral-tiny"), cut_src, *tiny_args])
        convert = [*cli("mistral-convert"), cut_src, cut_jax]
        check.build("cut-convert", cut_jax, convert, ["cut-build"])
        stream = ["--stream-layers"]
        check.verify("cut-verify-gpu", cut_src, cut_jax, gpu, ["cut-convert"], stream)
        check.verify("cut-verify-cpu", cut_src, cut_jax, "cpu", ["cut-convert"], stream)

    if "tests" in groups:
        workers = opts.test_workers
        if workers is None:
            workers = 8 if gpu == "gpu" and importlib.util.find_spec("xdist") else 0
        tests = [sys.executable, "-m", "pytest", "-q", "-m", "not slow", "-p", "no:cacheprovider"]
        tests += ["-n", workers] if workers else []
        check.step("tests", [*tests, ROOT / "tests"], 300, cwd=ROOT)

    if not opts.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    check.result["seconds"] = round(time.perf_counter() - start, 1)
    check.save()
    print(summary(check.result))
    steps = check.result["steps"]
    sys.exit(0 if all(r["rc"] == 0 and r.get("verdict", "pass") == "pass" for r in steps) else 1)


if __name__ == "__main__":
    main()
