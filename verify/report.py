"""Write a verification result as report.md (verdict first), report.json and drift.png."""

import json
from pathlib import Path

from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state
from tabulate import tabulate


def write_report(result: dict, folder: str | Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(json.dumps(result, indent=2) + "\n")
    (folder / "report.md").write_text(markdown(result))
    plot_drift(result, folder / "drift.png")
    return folder


def _g(value) -> str:
    return "" if value is None else f"{value:.3g}"


def markdown(r: dict) -> str:
    verdict = "PASS" if r["verdict"] == "pass" else "FAIL"
    lines = [f"# Parity report: {verdict}", ""]
    if r["reasons"]:
        lines += ["Why it failed:", ""] + [f"- {reason}" for reason in r["reasons"]] + [""]
        if r["first_failing_layer"] is not None:
            lines += [f"First failing block (teacher-forced): **{r['first_failing_layer']}**.", ""]
    else:
        lines += [
            "Every gate passed: every block's teacher-forced error is within its gate, "
            "the free-running error is within the bf16 noise floor, the checksums match "
            "the manifest.",
            "",
        ]
    env = r["environment"]
    lines += [
        f"dtype **{r['dtype']}**; torch on {env['torch_device']}, JAX on {env['jax_device']}; "
        f"{sum(p['tokens'] for p in r['prompts'])} prompt tokens in {len(r['prompts'])} prompts "
        f"(longest {max(p['tokens'] for p in r['prompts'])}); {r['seconds']:.0f} s.",
        "",
        "## Per-layer drift",
        "",
        "*free*: each model runs on its own outputs; *teacher-forced*: the port's block gets the "
        "reference's input, so only that block can differ. *floor*: the reference's own "
        "bf16-vs-fp32 error; *÷floor*: the port's bf16 error divided by it (≈1 or below is "
        "ideal). *fp32*: port vs reference, both fp32.",
        "",
    ]
    peer = r.get("peer")
    rows = []
    for e in [r["embeddings"], *r["layers"], r["final_norm"]]:
        tf = e.get("teacher_forced", {})
        row = [
            e["name"],
            _g(e["free"]["rel_l2"]),
            _g(e["free"]["max_abs"]),
            _g(e["free"]["cosine"]),
            _g(e["noise_floor"]),
            _g(e["bf16_error_over_floor"]),
            _g(tf.get("rel_l2")),
            _g(e.get("teacher_forced_noise_floor")),
            _g(e.get("teacher_forced_bf16_over_floor")),
            _g(e["fp32_rel_l2"]),
            _g(e.get("teacher_forced_fp32_rel_l2")),
        ]
        if peer:
            row += [_g(e.get("peer_rel_l2")), _g(e.get("peer_fp32_rel_l2"))]
        rows.append([*row, {True: "pass", False: "FAIL"}.get(e.get("passed"), "")])
    headers = [
        "layer",
        "free rel L2",
        "free max|Δ|",
        "free cos",
        "floor",
        "free ÷floor",
        "TF rel L2",
        "TF floor",
        "TF ÷floor",
        "fp32 free",
        "fp32 TF",
    ]
    if peer:
        headers += [f"{peer} rel L2", f"{peer} fp32"]
    lines += [tabulate(rows, headers=[*headers, "gate"], tablefmt="github"), ""]
    if peer:
        lines += [
            f"*{peer} rel L2 / fp32*: the {peer} peer (free-running) vs the reference; "
            "its last block's output comes normed, so it is shown at the final norm.",
            "",
        ]
    lg = r["logits"]
    lines += [
        "## Logits",
        "",
        tabulate(
            [
                ["KL(ref‖port) mean / median", f"{lg['kl_mean']:.3g} / {lg['kl_median']:.3g}"],
                [
                    "KL p90 / p99 / p99.9",
                    f"{lg['kl_p90']:.3g} / {lg['kl_p99']:.3g} / {lg['kl_p99_9']:.3g}",
                ],
                ["KL max (token index)", f"{lg['kl_max']:.3g} ({lg['kl_argmax_position']})"],
                [
                    "same top-1",
                    f"{100 * lg['same_top1']:.2f} % ± {100 * lg['same_top1_sigma']:.2f}",
                ],
                ["top-5 overlap", f"{100 * lg['top5_overlap']:.2f} %"],
                [
                    "Δp of reference top token, mean / max",
                    f"{lg['delta_p_ref_top_mean_abs']:.3g} / {lg['delta_p_ref_top_max_abs']:.3g}",
                ],
                ["max |Δlogit|", _g(lg["max_abs_logit_diff"])],
                ["bf16 error ÷ floor", _g(lg["bf16_error_over_floor"])],
                ["fp32 relative L2", _g(lg["fp32_rel_l2"])],
            ],
            headers=["metric", f"port vs reference ({r['dtype']}, {lg['tokens']} tokens)"],
            tablefmt="github",
        ),
        "",
    ]
    if "peer" in lg:
        pl = lg["peer"]
        lines += [
            f"Peer ({peer}) vs reference ({r['dtype']}): KL mean {pl['kl_mean']:.3g}, same "
            f"top-1 {100 * pl['same_top1']:.2f} %, max |Δlogit| "
            f"{pl['max_abs_logit_diff']:.3g}; bf16 error ÷ floor "
            f"{pl['bf16_error_over_floor']:.3g}; fp32 relative L2 {pl['fp32_rel_l2']:.3g}.",
            "",
        ]
    lines += _generation_section(r["generation"])
    checks = r["checksums"]
    lines += [
        "## Checksums",
        "",
        "Converted folder matches its manifest."
        if checks["ok"]
        else "Converted folder does NOT match its manifest:",
        "",
    ]
    lines += [f"- {p}" for p in checks["problems"]]
    lines += [
        "",
        "## Environment",
        "",
        tabulate(
            [[k, v] for k, v in env["versions"].items()]
            + [["python", env["python"]], ["platform", env["platform"]]],
            headers=["package", "version"],
            tablefmt="github",
        ),
        "",
    ]
    return "\n".join(lines)


def _generation_section(gen: dict | None) -> list[str]:
    if gen is None:
        return ["## Generation", "", "Skipped (`--stream-layers`: whole models not loaded).", ""]
    rows = [
        [
            i,
            p["exact_match"],
            p["matched_prefix"],
            _g(p["teacher_forced_top1"]),
            p["reference_text"].replace("\n", "⏎")[:60],
            p["port_text"].replace("\n", "⏎")[:60],
        ]
        for i, p in enumerate(gen["prompts"])
    ]
    return [
        "## Generation (greedy)",
        "",
        f"{gen['exact_match_prompts']}/{len(gen['prompts'])} prompts identical over "
        f"{gen['max_new_tokens']} tokens; teacher-forced top-1 agreement along the "
        f"reference's continuation: {100 * gen['teacher_forced_top1']:.1f} %.",
        "",
        tabulate(
            rows,
            headers=["prompt", "identical", "matched prefix", "TF top-1", "reference", "port"],
            tablefmt="github",
        ),
        "",
    ]


def plot_drift(r: dict, path: Path) -> None:
    entries = [*r["layers"], r["final_norm"]]  # embeddings are exact: nothing to plot
    x = range(len(entries))
    fig = Figure(figsize=(9, 4.5))
    ax = fig.subplots()
    floor = [e["noise_floor"] for e in entries]
    ax.plot(x, floor, "k--", label="noise floor: reference bf16 vs fp32 (free)")
    ax.plot(
        x,
        [e["free"]["rel_l2"] for e in entries],
        "o-",
        label=f"port vs reference, free ({r['dtype']})",
    )
    blocks = [i for i, e in enumerate(entries) if "teacher_forced" in e]
    ax.plot(
        blocks,
        [entries[i]["teacher_forced"]["rel_l2"] for i in blocks],
        "s-",
        label=f"port vs reference, teacher-forced ({r['dtype']})",
    )
    ax.plot(
        blocks,
        [entries[i]["teacher_forced_noise_floor"] for i in blocks],
        "k:",
        label="noise floor, teacher-forced",
    )
    ax.plot(
        x,
        [max(e["fp32_rel_l2"], 1e-12) for e in entries],
        "^-",
        alpha=0.6,
        label="port vs reference, fp32 (free)",
    )
    if r["first_failing_layer"] is not None:
        ax.axvline(
            r["first_failing_layer"] + 1,
            color="red",
            alpha=0.4,
            label=f"first failing block ({r['first_failing_layer']})",
        )
    ax.set_yscale("log")
    ax.set_xticks(list(x), [e["name"].replace("block ", "") for e in entries], fontsize=7)
    ax.set_xlabel("block (then final norm)")
    ax.set_ylabel("relative L2 error")
    ax.set_title(f"Per-layer drift: {r['verdict'].upper()}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
