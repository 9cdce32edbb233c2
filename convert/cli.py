"""`mistral-convert SRC OUT` and `mistral-convert --check OUT`."""

import dataclasses
import json
import resource
import signal
import sys

import click

from checkpoint.cli_errors import OneLineErrors, dtype_option, json_option, refuse_unused
from checkpoint.errors import CheckpointError
from convert.check import check_converted
from convert.convert import LAYOUTS, TARGET_DTYPES, convert_checkpoint
from convert.progress import Progress


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


@click.command(cls=OneLineErrors)
@click.argument("paths", nargs=-1, metavar="SRC OUT | --check OUT")
@click.option(
    "--max-shard-size",
    default="5GB",
    show_default=True,
    help="Largest shard (decimal units as HF: 5GB = 5e9 bytes; GiB for binary).",
)
@dtype_option(
    TARGET_DTYPES,
    "keep",
    help="keep: byte-identical copy of every tensor (FP8 included). A dtype: the text "
    "tensors cast to it, FP8 weights dequantized and their scales left out; vision tensors "
    "are always copied as they are.",
)
@click.option(
    "--format",
    "layout",
    type=click.Choice(LAYOUTS),
    default="official",
    show_default=True,
    help="hf: transformers layout (HF names, config.json, wq/wk permuted).",
)
@click.option(
    "--text-only",
    is_flag=True,
    help="Leave a vision encoder out (its tensors, and its keys in params.json).",
)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--check", "check", is_flag=True, help="Verify OUT against its manifest.")
@json_option("Print a JSON summary on stdout.")
@click.pass_context
def main(ctx, paths, max_shard_size, dtype, layout, text_only, overwrite, check, as_json) -> None:
    """Convert a Mistral checkpoint folder SRC (official, or HF transformers) into sharded
    safetensors in OUT."""
    if check:
        refuse_unused(
            ctx,
            ["max_shard_size", "dtype", "layout", "text_only", "overwrite"],
            mode="--check",
            reason="--check converts nothing: it re-verifies OUT against its manifest",
        )
        if len(paths) != 1:
            _fail("--check takes exactly one folder: mistral-convert --check OUT")
        problems = check_converted(paths[0])
        for problem in problems:
            click.echo(f"check failed: {problem}", err=True)
        if as_json:
            click.echo(json.dumps({"folder": paths[0], "ok": not problems, "problems": problems}))
        elif not problems:
            click.echo(f"{paths[0]}: all files match the manifest and the spec")
        sys.exit(1 if problems else 0)
    if len(paths) != 2:
        _fail("expected SRC and OUT: mistral-convert SRC OUT")
    src, out = paths
    # SIGTERM unwinds like Ctrl-C, so the partial folder is removed.
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        summary = convert_checkpoint(
            src,
            out,
            max_shard_size=max_shard_size,
            dtype=dtype,
            overwrite=overwrite,
            layout=layout,
            text_only=text_only,
            progress=Progress("converting"),
        )
    except (CheckpointError, ValueError) as err:  # ValueError: an option's value
        _fail(str(err))
    except OSError as err:  # reading errors are CheckpointErrors naming the source
        _fail(f"{out}: cannot write ({err.strerror or err})")
    except KeyboardInterrupt:
        click.echo("error: interrupted; nothing was written", err=True)
        sys.exit(130)
    finally:
        signal.signal(signal.SIGTERM, previous)
    for note in summary.notes:
        click.echo(f"note: {note}", err=True)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if as_json:
        click.echo(json.dumps(dataclasses.asdict(summary) | {"peak_rss_mb": peak_mb}))
    else:
        click.echo(
            f"wrote {summary.out}: {summary.tensors} tensors in {summary.shards} shard(s), "
            f"{summary.bytes_written / 1e9:.2f} GB in {summary.seconds:.1f} s"
        )
        if summary.carried:
            click.echo(f"  carried {summary.carried} vision tensor(s) byte for byte")
        if summary.dequantized:
            click.echo(f"  dequantized {summary.dequantized} FP8 weight(s)")
        for why, count in summary.left_out:
            click.echo(f"  left out {count} tensor(s): {why}")
