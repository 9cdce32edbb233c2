"""`mistral-verify`: layer-by-layer parity of the converted JAX model against the reference.

Exit code 0: pass; 1: parity (or checksum) failure; 2: bad input or usage.
"""

import json
import sys
from pathlib import Path

import click

from checkpoint.cli_errors import (
    OneLineErrors,
    dtype_option,
    json_option,
    max_new_tokens_option,
    mesh_option,
)
from checkpoint.dtypes import DTYPE_NAMES
from checkpoint.errors import CheckpointError
from checkpoint.tokenizer import Tokenizer
from convert.progress import Progress
from model_jax.sharding import make_mesh
from verify.gates import Thresholds
from verify.prompts import read_prompts
from verify.report import check_report_dir, write_report
from verify.run import ChecksumFailure, resolve_devices, run_verification

# verify runs the reference in bf16 or fp32 only (its truth is fp32); names as everywhere else
VERIFY_DTYPES = tuple(name for name in DTYPE_NAMES if name in ("bfloat16", "float32"))


@click.command(cls=OneLineErrors)
@click.argument("folders", nargs=-1, type=click.Path(path_type=Path), metavar="REFERENCE CONVERTED")
@click.option(
    "--reference",
    type=click.Path(path_type=Path),
    help="Same as the REFERENCE argument: the official checkpoint folder (run by the torch "
    "reference).",
)
@click.option(
    "--converted",
    type=click.Path(path_type=Path),
    help="Same as the CONVERTED argument: the mistral-convert output folder (run by the JAX "
    "model).",
)
@dtype_option(VERIFY_DTYPES, "bfloat16")
@click.option(
    "--device", type=click.Choice(["auto", "cpu", "gpu"]), default="auto", show_default=True
)
@click.option(
    "--prompts",
    "prompts_file",
    type=click.Path(path_type=Path),
    help='One prompt per line, or JSONL lines {"text": ...} / {"tokens": [...]} / '
    '{"messages": [...]} (default: the built-in set).',
)
@max_new_tokens_option()
@click.option(
    "--report-dir",
    type=click.Path(path_type=Path),
    help="Default: reports/<model>-<dtype>-<device>/.",
)
@click.option(
    "--stream-layers",
    is_flag=True,
    help="Hold one block of each model at a time (skips generation agreement).",
)
@click.option("--thresholds", help="Override gates: name=value,... (see verify/gates.py).")
@click.option(
    "--peer",
    type=click.Choice(["hf"]),
    help="Add HF transformers as a third implementation (needs transformers).",
)
@mesh_option()
@json_option("Print report.json on stdout.")
def main(
    folders,
    reference,
    converted,
    dtype,
    device,
    prompts_file,
    max_new_tokens,
    report_dir,
    stream_layers,
    thresholds,
    peer,
    mesh,
    as_json,
) -> None:
    """Compare the torch reference on the official folder REFERENCE with the JAX model on the
    converted folder CONVERTED (also accepted as --reference/--converted)."""
    reference, converted = _folders(folders, reference, converted)
    try:
        for folder in (reference, converted):
            if not folder.is_dir():
                raise CheckpointError(folder, "not a directory")
        where = "gpu" if resolve_devices(device)[0] == "cuda" else "cpu"
        report_dir = report_dir or Path("reports") / f"{converted.name}-{dtype}-{where}"
        check_report_dir(report_dir)
        progress = VerifyProgress()
        prompts = None
        if prompts_file is not None:
            prompts = read_prompts(prompts_file, Tokenizer.from_folder(reference))
        result = run_verification(
            reference,
            converted,
            dtype=dtype,
            device=device,
            prompts=prompts,
            max_new_tokens=max_new_tokens,
            stream_layers=stream_layers,
            thresholds=Thresholds.parse(thresholds),
            peer=peer,
            mesh=make_mesh(mesh) if mesh else None,
            on_step=progress,
        )
    except KeyboardInterrupt:
        click.echo("error: interrupted", err=True)
        sys.exit(130)
    except ChecksumFailure as failure:
        problems = [*failure.problems, str(failure.cause)]
        summary = f"{converted} does not match its manifest and cannot be loaded"
        if as_json:
            click.echo(json.dumps({"verdict": "fail", "reasons": [summary, *problems]}))
        else:
            click.echo(f"FAIL: {summary}")
            for problem in problems[:20]:
                click.echo(f"  {problem}")
        sys.exit(1)
    except (CheckpointError, ValueError) as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)
    folder = write_report(result, report_dir)
    if as_json:
        click.echo(result.to_json(), nl=False)
    else:
        click.echo(f"{result.verdict.upper()}: report in {folder}/report.md")
        for reason in result.reasons[:20]:
            click.echo(f"  {reason}")
    sys.exit(0 if result.passed else 1)


def _folders(positional, reference, converted) -> tuple[Path, Path]:
    """REFERENCE and CONVERTED, given either as the two arguments or as the two options."""
    if reference is None and converted is None:
        if len(positional) != 2:
            raise click.UsageError(
                f"expected REFERENCE and CONVERTED, got {len(positional)} folder(s): "
                "mistral-verify REFERENCE CONVERTED"
            )
        return positional[0], positional[1]
    if positional or reference is None or converted is None:
        raise click.UsageError(
            "give the folders either as arguments (mistral-verify REFERENCE CONVERTED) or as "
            "--reference and --converted, not a mix"
        )
    return reference, converted


class VerifyProgress:
    """The phase and the block on a tqdm bar (blocks done of N, ETA); silent off a terminal."""

    def __init__(self):
        self.bar = Progress("verify", unit="block")
        self.bar.start(None)

    def __call__(self, message: str) -> None:
        if message.startswith("teacher-forced: block "):
            done, total = (int(n) for n in message.split()[-1].split("/"))
            if self.bar.total != total:
                self.bar.restart(total)
                self.bar.phase("teacher-forced")
            self.bar(1)
            if done == total:
                self.bar.finish()
        else:
            self.bar.phase(message)
