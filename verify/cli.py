"""`mistral-verify`: parity of the JAX port against the torch reference."""

import json
import sys
from pathlib import Path

import click
from tabulate import tabulate

from checkpoint.errors import CheckpointError
from checkpoint.tokenizer import Tokenizer
from verify.parity import logit_parity
from verify.prompts import BUILTIN_PROMPTS


def _fmt(value) -> str:
    return "" if value is None else f"{value:.3g}"


@click.command()
@click.option(
    "--reference",
    "reference",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Official checkpoint folder, run by the torch reference.",
)
@click.option(
    "--converted",
    "converted",
    default=None,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Folder the JAX model loads (default: the reference folder).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def main(reference: Path, converted: Path | None, as_json: bool) -> None:
    """Compare the JAX model's logits with the torch reference's; exit 1 on a parity failure."""
    try:
        tokenizer = Tokenizer(reference / "tokenizer.model")
        prompts = [tokenizer.encode(text) for text in BUILTIN_PROMPTS]
        rows = logit_parity(reference, converted or reference, prompts)
    except CheckpointError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)
    passed = all(r.passed for r in rows)
    if as_json:
        click.echo(
            json.dumps(
                {"verdict": "pass" if passed else "fail", "logits": [r.__dict__ for r in rows]},
                indent=2,
            )
        )
    else:
        table = [
            [
                r.dtype,
                r.tokens,
                _fmt(r.rel_l2),
                _fmt(r.max_abs_logit_diff),
                f"{100 * r.top1_agreement:.1f}",
                _fmt(r.kl_mean),
                _fmt(r.noise_floor),
                _fmt(r.noise_ratio),
                "pass" if r.passed else "FAIL",
            ]
            for r in rows
        ]
        headers = [
            "dtype",
            "tokens",
            "rel L2",
            "max |Δlogit|",
            "top-1 %",
            "KL mean",
            "bf16 floor",
            "err/floor",
            "gate",
        ]
        click.echo(f"verdict: {'PASS' if passed else 'FAIL'}  ({reference} vs JAX port)")
        click.echo(tabulate(table, headers=headers, tablefmt="github"))
    sys.exit(0 if passed else 1)
