"""Write a `Report` as report.md (verdict first), report.json and drift.png."""

import json
import math
import os
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state
from tabulate import tabulate

from checkpoint.errors import CheckpointError
from verify.results import REPORT_FORMAT, GenerationResult, LayerResult, PieceResult, Report

REPORT_FILES = ("report.md", "report.json", "drift.png")


def check_report_dir(folder: Path) -> None:
    """CheckpointError unless `folder` can take a report without replacing anything that is
    not ours: it is new, or a folder whose report files (if any) mistral-verify wrote."""
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(folder, "--report-dir exists and is not a directory")
    present = [name for name in REPORT_FILES if (folder / name).exists()]
    if present and not _ours(folder / "report.json"):
        raise CheckpointError(
            folder,
            f"holds {', '.join(present)} not written by mistral-verify; choose another "
            "--report-dir",
        )


def _ours(path: Path) -> bool:
    try:
        return json.loads(path.read_text()).get("format") == REPORT_FORMAT
    except (OSError, ValueError, AttributeError, RecursionError):
        return False


def write_report(report: Report, folder: str | Path) -> Path:
    """report.json, report.md and drift.png in `folder`, each replaced atomically."""
    folder = Path(folder)
    check_report_dir(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _replace(folder / "report.json", lambda path: path.write_text(report.to_json()))
    _replace(folder / "report.md", lambda path: path.write_text(markdown(report)))
    _replace(folder / "drift.png", lambda path: plot_drift(report, path))
    return folder


def _replace(path: Path, write) -> None:
    """Write through a hidden temporary file, then rename it over `path`."""
    temporary = path.with_name(f".{path.stem}.writing-{os.getpid()}{path.suffix}")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _g(value) -> str:
    if value is None:
        return ""
    return f"{value:.3g}" if math.isfinite(value) else str(value)


def markdown(r: Report) -> str:
    lines = [f"# Parity report: {r.verdict.upper()}", ""]
    if r.reasons:
        shown = r.reasons[:20]
        more = [f"- … and {len(r.reasons) - 20} more (report.json)"] if len(r.reasons) > 20 else []
        lines += ["Why it failed:", ""] + [f"- {reason}" for reason in shown] + more + [""]
        if r.first_failing_layer is not None:
            lines += [f"First failing block (teacher-forced): **{r.first_failing_layer}**.", ""]
    else:
        lines += [
            "Every gate passed: each piece of every block is as accurate as the reference's own "
            "bf16 on the same input (and matches it in fp32), the outputs are within the "
            "reference's own bf16 noise, generation agrees, the checksums match the manifest.",
            "",
        ]
    env = r.environment
    lines += [
        f"dtype **{r.dtype}**; torch on {env.torch_device}, JAX on {env.jax_device}; "
        f"{sum(p.tokens for p in r.prompts)} prompt tokens in {len(r.prompts)} prompts "
        f"(longest {max(p.tokens for p in r.prompts)}); "
        f"{'streamed one block at a time' if r.stream_layers else 'whole models'}; "
        f"{r.seconds:.0f} s{_peak_memory(env)}.",
        "",
        *(["## Model", "", *[f"- {n}" for n in r.notes], ""] if r.notes else []),
        "## Prompts",
        "",
        tabulate(
            [
                [
                    j + 1,
                    p.kind,
                    p.tokens,
                    "yes" if p.bos else "no",
                    p.verdict.upper(),
                    _cell(p.text),
                ]
                for j, p in enumerate(r.prompts)
            ],
            headers=["#", "kind", "tokens", "BOS", "verdict", "prompt"],
            tablefmt="github",
        ),
        "",
    ]
    lines += _layers_section(r)
    lines += _logits_section(r)
    lines += _generation_section(r.generation)
    lines += [
        "## Checksums",
        "",
        "Converted folder matches its manifest."
        if r.checksums.ok
        else "Converted folder does NOT match its manifest:",
        "",
        *[f"- {p}" for p in r.checksums.problems],
        "",
        "## Environment",
        "",
        tabulate(
            [[k, v] for k, v in env.versions.items()]
            + [["python", env.python], ["platform", env.platform]],
            headers=["package", "version"],
            tablefmt="github",
        ),
        "",
    ]
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("\n", "⏎").replace("|", "\\|")[:70]


def _worst_piece(layer: LayerResult) -> str:
    rated = [p for p in layer.pieces if p.piece != "block" and p.bf16_ratio is not None]
    if not rated:
        return ""
    worst = max(rated, key=lambda p: p.bf16_ratio if math.isfinite(p.bf16_ratio) else math.inf)
    return f"{_g(worst.bf16_ratio)} ({worst.piece})"


def _layers_section(r: Report) -> list[str]:
    peer = r.peer
    rows = []
    for layer in [r.embeddings, *r.layers, r.final_norm]:
        block = next((p for p in layer.pieces if p.piece == "block"), None)
        fp32_tf = max((p.fp32_error for p in layer.pieces), default=None)
        row = [
            layer.name,
            _g(layer.free.rel_l2),
            _g(layer.free.max_abs),
            _g(layer.free_floor),
            _g(layer.free_bf16_ratio)
            + (f" ({layer.free_rerouted} left out)" if layer.free_rerouted else ""),
            _g(layer.free_fp32_error),
            _g(layer.free_fp32_ratio),
            _g(block.bf16_ratio if block else None),
            _worst_piece(layer),
            _g(fp32_tf),
        ]
        if peer:
            row += [_g(layer.peer_bf16_ratio), _g(layer.peer_fp32_error)]
        gate = "FAIL" if layer.failures else ("pass" if layer.pieces or layer.index is None else "")
        rows.append([*row, gate])
    headers = [
        "layer",
        "free rel L2",
        "free max|Δ|",
        "floor",
        "free ÷ref",
        "free fp32",
        "free fp32 ÷ref",
        "TF block ÷ref",
        "TF worst piece ÷ref",
        "TF fp32",
    ]
    if peer:
        headers += [f"{peer} ÷ref", f"{peer} fp32"]
    peer_note = [
        f"*{peer} ÷ref / fp32*: the {peer} peer (free-running) vs the reference; its last "
        "block's output comes normed, so it is shown at the final norm. The peer offers only "
        "its whole forward, so it is not judged piece by piece.",
        "",
    ]
    return [
        "## Per-layer drift",
        "",
        "*free*: each model runs on its own outputs (*rel L2*, *max|Δ|*: port vs reference in "
        f"{r.dtype}). *floor*: the reference's own bf16 error against its fp32 run; *÷ref*: "
        "the port's bf16 error against the same fp32 truth divided by the reference's (≈1 or "
        "below is ideal; *left out*: tokens a router could re-route on bf16 noise, see the "
        "Logits section). *TF* (teacher-forced): every piece the block declares (next table), "
        "and the whole block, gets the reference's own bf16 input to that piece, so only that "
        "piece can differ; the gate is on every piece. Errors are scale-aware: each element's "
        "error relative to |truth| plus its token's median |truth|, so a few massive "
        "activations cannot dominate. *fp32*: port vs reference, both fp32; *fp32 ÷ref*: the "
        "port's fp32 error against the reference run in float64, ÷ the reference's own fp32 "
        "error against it (fp32 rounding grows with depth for both alike).",
        "",
        tabulate(rows, headers=[*headers, "gate"], tablefmt="github"),
        "",
        *(peer_note if peer else []),
        *_pieces_section(r),
    ]


def _piece_cell(piece: PieceResult | None, bf16: bool) -> str:
    if piece is None:
        return ""
    if bf16 and piece.bf16_exact_error is not None:  # computed in fp32 in both
        return f"fp32 {_g(piece.bf16_exact_error)}"
    return _g(piece.bf16_ratio if bf16 else piece.fp32_error)


def _mismatch(piece: PieceResult, bf16: bool) -> float:
    return piece.integer_mismatch_bf16 if bf16 else piece.integer_mismatch_fp32


def _pieces_section(r: Report) -> list[str]:
    """One column per piece the blocks declare (`checkpoint.pieces`), in declared order."""
    names = list(dict.fromkeys(p.piece for layer in r.layers for p in layer.pieces))
    bf16 = r.dtype == "bfloat16"
    rows = []
    for layer in r.layers:
        by_name = {p.piece: p for p in layer.pieces}
        cells = []
        for name in names:
            piece = by_name.get(name)
            cells.append(_piece_cell(piece, bf16))
        mismatch = [
            f"{p.piece} {100 * _mismatch(p, bf16):.1f} %"
            for p in layer.pieces
            if p.integer_mismatch_fp32 is not None
        ]
        rows.append([layer.name, *cells, ", ".join(mismatch)])
    what = "bf16 error ÷ the reference's own" if bf16 else "fp32 error"
    lines = [
        "## Teacher-forced pieces",
        "",
        f"Each piece of each block on the reference's own input to it: {what}. Integer outputs "
        "(a router's chosen experts): tokens whose values differ from the fp32 truth.",
        "",
        tabulate(rows, headers=["layer", *names, "integer outputs"], tablefmt="github"),
        "",
    ]
    return lines


def _logits_section(r: Report) -> list[str]:
    lg, m = r.logits, r.logits.metrics
    rows = [
        ["KL(ref‖port) mean / median", f"{m.kl_mean:.3g} / {m.kl_median:.3g}"],
        ["KL p90 / p99 / p99.9", f"{m.kl_p90:.3g} / {m.kl_p99:.3g} / {m.kl_p99_9:.3g}"],
        ["KL max (token index)", f"{m.kl_max:.3g} ({m.kl_argmax_position})"],
        ["same top-1", f"{100 * m.same_top1:.2f} % ± {100 * m.same_top1_sigma:.2f}"],
        ["top-5 overlap", f"{100 * m.top5_overlap:.2f} %"],
        [
            "Δp of reference top token, mean / max",
            f"{m.delta_p_ref_top_mean_abs:.3g} / {m.delta_p_ref_top_max_abs:.3g}",
        ],
        ["max |Δlogit|", _g(m.max_abs_logit_diff)],
        ["bf16 error ÷ reference's own", _g(lg.bf16_ratio)],
        ["fp32 error", _g(lg.fp32_error)],
    ]
    lines = [
        "## Logits",
        "",
        tabulate(
            rows,
            headers=["metric", f"port vs reference ({r.dtype}, {m.tokens} tokens)"],
            tablefmt="github",
        ),
        "",
    ]
    if lg.peer is not None:
        pm = lg.peer.metrics
        lines += [
            f"Peer ({r.peer}) vs reference ({r.dtype}): KL mean {pm.kl_mean:.3g}, same top-1 "
            f"{100 * pm.same_top1:.2f} %, max |Δlogit| {pm.max_abs_logit_diff:.3g}; bf16 error "
            f"÷ reference's own {_g(lg.peer.bf16_ratio)}; fp32 error {_g(lg.peer.fp32_error)}.",
            "",
        ]
    if lg.rerouted:
        lines += [
            f"{lg.rerouted} of {m.tokens} tokens are left out of the free-running bf16 ratios "
            "(final norm, logits): at some block the reference's own bf16 noise reaches a "
            "near-tie of its router, so either model may send them to other experts "
            "(verify/routing.py). Routing itself is judged per block, tie-aware (router piece).",
            "",
        ]
    if lg.other_reading is not None:
        o = lg.other_reading
        lines += [
            f"Other reading (not judged): with HF transformers' Mistral4 softmax scale (× "
            f"{o.softmax_factor:.4g}, YaRN's magnitude² despite apply_scale false; this "
            f"toolkit and vLLM keep the base scale) the reference's fp32 logits move by "
            f"{_g(o.error)}, {_g(o.ratio)}× its own {o.noise_dtype} error ({_g(o.noise)}); the "
            f"top-1 token changes at {o.top1_changed} of {o.positions} positions.",
            "",
        ]
    return lines


def _generation_section(gen: GenerationResult | None) -> list[str]:
    if gen is None:
        return ["## Generation", "", "Skipped (`--stream-layers`: whole models not loaded).", ""]
    rows = [
        [
            i + 1,
            p.exact_match,
            p.matched_prefix,
            _g(p.teacher_forced_top1),
            _cell(p.reference_text)[:60],
            _cell(p.port_text)[:60],
        ]
        for i, p in enumerate(gen.prompts)
    ]
    baseline = []
    if gen.reference_fp32_top1 is not None:
        peer = f", the peer's bf16 run {100 * gen.peer_top1:.1f} %" if gen.peer_top1 else ""
        baseline.append(
            f"The reference's own fp32 run agrees with its bf16 continuation on "
            f"{100 * gen.reference_fp32_top1:.1f} %{peer}: a faithful bf16 port may disagree "
            f"on at most {gen.allowed_disagreements} of {gen.tokens} tokens."
        )
    elif gen.fp32_logit_noise is not None:
        baseline.append(
            f"fp32: {gen.near_ties} of the {gen.disagreements} disagreements are near-ties (the "
            f"reference prefers its token by less than 4× its own fp32 noise, "
            f"{gen.fp32_logit_noise:.2g} in logits); none other is allowed."
        )
    return [
        "## Generation (greedy)",
        "",
        f"{gen.exact_match_prompts}/{len(gen.prompts)} prompts identical over "
        f"{gen.max_new_tokens} tokens; teacher-forced top-1 agreement along the "
        f"reference's continuation: {100 * gen.teacher_forced_top1:.1f} % "
        f"({gen.disagreements} of {gen.tokens} tokens differ).",
        "",
        *baseline,
        "",
        tabulate(
            rows,
            headers=["prompt", "identical", "matched prefix", "TF top-1", "reference", "port"],
            tablefmt="github",
        ),
        "",
    ]


def _plottable(values) -> np.ndarray:
    """Values for a log axis: non-finite and non-positive become gaps (NaN)."""
    out = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
    out[~np.isfinite(out) | (out <= 0)] = np.nan
    return out


def plot_drift(r: Report, path: Path) -> None:
    entries = [*r.layers, r.final_norm]  # embeddings are exact: nothing to plot
    x = np.arange(len(entries))
    fig = Figure(figsize=(10, 7))
    top, bottom = fig.subplots(2, 1, sharex=True)
    top.plot(x, _plottable([e.free_floor for e in entries]), "k--", label="reference bf16 (floor)")
    top.plot(x, _plottable([e.free.scaled for e in entries]), "o-", label=f"port ({r.dtype})")
    top.plot(
        x, _plottable([e.free_fp32_error for e in entries]), "^-", alpha=0.6, label="port fp32"
    )
    top.set_yscale("log")
    top.set_ylabel("free-running error vs fp32 reference")
    top.legend(fontsize=7)
    blocks = x[:-1]
    names = dict.fromkeys(p.piece for layer in r.layers for p in layer.pieces)  # declared order
    for piece in names:
        ratios = [
            next((p.bf16_ratio for p in e.pieces if p.piece == piece), None) for e in r.layers
        ]
        if any(v is not None for v in ratios):
            style = "s-" if piece == "block" else ".-"
            bottom.plot(blocks, _plottable(ratios), style, label=piece, alpha=0.8)
    bottom.axhline(r.thresholds["teacher_forced_bf16_ratio"], color="red", alpha=0.5, label="gate")
    bottom.set_ylabel("teacher-forced bf16 error ÷ reference's own")
    bottom.set_yscale("log")
    bottom.legend(fontsize=7, ncol=3)
    if r.first_failing_layer is not None:
        for ax in (top, bottom):
            ax.axvline(r.first_failing_layer, color="red", alpha=0.3)
    bottom.set_xticks(list(x), [e.name.replace("block ", "") for e in entries], fontsize=7)
    bottom.set_xlabel("block (then final norm)")
    top.set_title(f"Per-layer drift: {r.verdict.upper()}")
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")


def _peak_memory(env) -> str:
    peaks = {"torch": env.torch_peak_gpu_bytes, "JAX": env.jax_peak_gpu_bytes}
    shown = [f"{name} {value / 2**30:.1f} GiB" for name, value in peaks.items() if value]
    return f"; peak GPU memory {', '.join(shown)}" if shown else ""
