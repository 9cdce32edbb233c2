"""`mistral-tiny OUT`: write a seeded random checkpoint in the official format."""

import sys
from pathlib import Path

import click

from checkpoint.args import ModelArgs
from checkpoint.cli_errors import OneLineErrors
from checkpoint.errors import CheckpointError
from checkpoint.presets import PRESETS, preset
from checkpoint.safe_files import new_folder
from checkpoint.synthetic import write_synthetic_checkpoint
from checkpoint.tiny import TINY_ARGS, WEIGHTS_FORMATS, check_tiny_size, write_tiny_checkpoint
from checkpoint.trained_like import trained_like_state_dict


@click.command(cls=OneLineErrors)
@click.argument("out", type=click.Path(file_okay=False))
@click.option(
    "--params",
    "params_path",
    type=click.Path(dir_okay=False),
    help="params.json to use instead of the embedded tiny config.",
)
@click.option(
    "--preset",
    "preset_name",
    type=click.Choice(list(PRESETS)),
    help="A full-size published shape (written tensor by tensor, bounded memory).",
)
@click.option("--n-layers", type=int, help="With --preset: keep only this many blocks.")
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--format",
    "weights_format",
    type=click.Choice(list(WEIGHTS_FORMATS)),
    default="pth",
    show_default=True,
)
@click.option(
    "--weights",
    type=click.Choice(["random", "trained-like"]),
    default="random",
    show_default=True,
    help="trained-like: massive activations at the first token and attention sinks, as "
    "trained models have (checkpoint/trained_like.py); not with --preset.",
)
def main(out, params_path, preset_name, n_layers, seed, weights_format, weights) -> None:
    """Write params.json, bf16 consolidated weights and a tokenizer into OUT (a new or empty
    folder; it appears only when complete)."""
    try:
        if preset_name:
            if weights != "random":
                raise ValueError("--weights trained-like is for tiny configs, not --preset")
            args = preset(preset_name, n_layers=n_layers)
        else:
            args = ModelArgs.from_json(params_path) if params_path else TINY_ARGS
            check_tiny_size(args)
        with new_folder(Path(out)) as building:
            if preset_name:
                write_synthetic_checkpoint(building, args, seed=seed)
            else:
                trained = weights == "trained-like"
                state = trained_like_state_dict(args, seed=seed) if trained else None
                write_tiny_checkpoint(
                    building, args, seed=seed, weights_format=weights_format, state=state
                )
    except (CheckpointError, ValueError) as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)
    click.echo(str(out))
