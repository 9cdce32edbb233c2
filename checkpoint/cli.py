"""`mistral-tiny OUT`: write a seeded random checkpoint in the official format."""

import json
import math
import sys
from pathlib import Path

import click

from checkpoint.args import ModelArgs
from checkpoint.cli_errors import OneLineErrors, json_option, refuse_unused, refuse_without
from checkpoint.errors import CheckpointError
from checkpoint.presets import PRESETS, preset
from checkpoint.safe_files import new_folder
from checkpoint.spec import tensor_spec
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
@click.option(
    "--n-layers", type=click.IntRange(1), help="With --preset: keep only this many blocks."
)
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
@json_option("Print a JSON summary (folder, files, parameter count) on stdout.")
@click.pass_context
def main(
    ctx, out, params_path, preset_name, n_layers, seed, weights_format, weights, as_json
) -> None:
    """Write params.json, bf16 consolidated weights and a tokenizer into OUT (a new or empty
    folder; it appears only when complete). --preset writes a full-size published shape as
    consolidated.00.pth (random values; --n-layers cuts it); without it, the embedded tiny
    config or --params, in --format, with --weights."""
    if preset_name:
        refuse_unused(
            ctx,
            ["params_path", "weights_format", "weights"],
            mode="--preset",
            reason="a preset fixes the shape and writes random bf16 consolidated.00.pth",
        )
    else:
        refuse_without(
            ctx, ["n_layers"], needed="--preset", reason="it cuts a preset to its first blocks"
        )
    try:
        if preset_name:
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
    if as_json:
        files = {p.name: p.stat().st_size for p in sorted(Path(out).iterdir())}
        summary = {"folder": str(out), "files": files, "parameters": _parameters(args)}
        click.echo(json.dumps(summary))
    else:
        click.echo(str(out))


def _parameters(args: ModelArgs) -> int:
    return sum(math.prod(shape) for shape in tensor_spec(args).values())
