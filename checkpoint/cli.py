"""`mistral-tiny OUT`: write a seeded random checkpoint in the official format."""

import sys

import click

from checkpoint.args import ModelArgs
from checkpoint.errors import CheckpointError
from checkpoint.tiny import TINY_ARGS, write_tiny_checkpoint


@click.command()
@click.argument("out", type=click.Path(file_okay=False))
@click.option(
    "--params",
    "params_path",
    type=click.Path(dir_okay=False),
    help="params.json to use instead of the embedded tiny config.",
)
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--format",
    "weights_format",
    type=click.Choice(["pth", "safetensors"]),
    default="pth",
    show_default=True,
)
def main(out: str, params_path: str | None, seed: int, weights_format: str) -> None:
    """Write params.json, bf16 consolidated weights and tokenizer.model into OUT."""
    try:
        args = ModelArgs.from_json(params_path) if params_path else TINY_ARGS
        folder = write_tiny_checkpoint(out, args, seed=seed, weights_format=weights_format)
    except (CheckpointError, ValueError) as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)
    click.echo(str(folder))
