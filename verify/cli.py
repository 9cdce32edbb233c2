"""`mistral-verify`: layer-by-layer parity of the converted JAX model against the reference.

Exit code 0: pass; 1: parity (or checksum) failure; 2: bad input or usage.
"""

import sys
from pathlib import Path

import click

from checkpoint.cli_errors import OneLineErrors
from checkpoint.errors import CheckpointError
from checkpoint.tokenizer import Tokenizer
from convert.progress import Progress
from model_jax.sharding import make_mesh
from verify.gates import Thresholds
from verify.prompts import read_prompts
from verify.report import check_report_dir, write_report
from verify.run import ChecksumFailure, resolve_devices, run_verification


@click.command(cls=OneLineErrors)
@click.option(
    "--reference",
    required=True,
    type=click.Path(path_type=Path),
    help="Official checkpoint folder (run by the torch reference).",
)
@click.option(
    "--converted",
    required=True,
    type=click.Path(path_type=Path),
    help="mistral-convert output folder (run by the JAX model).",
)
@click.option(
    "--dtype", type=click.Choice(["bfloat16", "float32"]), default="bfloat16", show_default=True
)
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
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=32, show_default=True)
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
@click.option("--mesh", help="Shard the JAX model over DATAxMODEL devices, e.g. 1x8.")
@click.option("--json", "as_json", is_flag=True, help="Print report.json to stdout.")
def main(
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
    """Compare the torch reference on REFERENCE with the JAX model on CONVERTED."""
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
        click.echo(f"FAIL: {converted} does not match its manifest and cannot be loaded")
        for problem in [*failure.problems, str(failure.cause)][:20]:
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
