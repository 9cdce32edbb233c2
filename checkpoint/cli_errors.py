"""What every command of the toolkit shares: one line on stderr and exit 2 for every usage
error, library warnings kept off a refusal's one line, and the options that mean the same thing
in several commands (spelled, typed and defaulted once, here).

Conventions of the four commands (`mistral-convert`, `mistral-verify`, `mistral-generate`,
`mistral-tiny`):

- the folders a command works on are positional arguments (`SRC OUT`, `REFERENCE CONVERTED`,
  `FOLDER`, `OUT`); options are settings;
- `--dtype` takes names of the one vocabulary (`checkpoint.dtypes.DTYPE_NAMES`), or the subset
  a command supports, spelled the same;
- `--max-new-tokens` is 1 to 32768, default 32, wherever tokens are generated;
- `--mesh DATAxMODEL` (or `DATAxEXPERTxMODEL`) wherever the JAX model is sharded;
- `--json` prints one JSON document on stdout instead of the human summary;
- an option that the chosen mode would ignore is an error naming both (`refuse_unused`).
"""

import sys
import warnings

import click
from click.core import ParameterSource

MAX_NEW_TOKENS = 32768
DEFAULT_NEW_TOKENS = 32  # verify's calibrated generation check; generate uses the same


class OneLineErrors(click.Command):
    """A click command whose usage errors (bad option values, missing arguments) print
    `error: ...` on one line and exit 2, instead of click's usage block.

    Warnings raised by libraries while the command runs (e.g. torch's about a pickle protocol)
    are held back: a command that refuses its input (exit 2) or is interrupted prints only its
    own line; one that runs to its verdict (exit 0 or 1) prints them after it. Run Python with
    `-W` (or PYTHONWARNINGS) to see them as they happen instead.
    """

    def main(self, *args, **kwargs):
        kwargs["standalone_mode"] = False
        if sys.warnoptions:  # the user chose how warnings show: leave them alone
            self._run(args, kwargs)
        done = SystemExit(0)
        with warnings.catch_warnings(record=True) as caught:
            try:
                self._run(args, kwargs)
            except SystemExit as exit_:
                done = exit_
        if done.code in (None, 0, 1):
            for w in caught:
                warnings.showwarning(w.message, w.category, w.filename, w.lineno, w.file, w.line)
        raise done

    def _run(self, args, kwargs):
        try:
            code = super().main(*args, **kwargs)
        except click.UsageError as err:
            click.echo(f"error: {err.format_message()}", err=True)
            sys.exit(2)
        except click.Abort:
            click.echo("error: interrupted", err=True)
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)


def given(ctx: click.Context, name: str) -> bool:
    """Whether the parameter `name` was set by the user (not left at its default)."""
    return ctx.get_parameter_source(name) not in (None, ParameterSource.DEFAULT)


def option_name(ctx: click.Context, name: str) -> str:
    """How the user spells the parameter `name` on the command line (`--max-shard-size`)."""
    for param in ctx.command.params:
        if param.name == name:
            return max(param.opts, key=len)
    raise KeyError(name)


def refuse_unused(ctx: click.Context, names: list[str], *, mode: str, reason: str = "") -> None:
    """UsageError (exit 2, one line) naming the first of the parameters `names` the user gave,
    which `mode` (e.g. "--check") would ignore."""
    for name in names:
        if given(ctx, name):
            why = reason or "it would be ignored"
            raise click.UsageError(f"{option_name(ctx, name)} cannot be used with {mode} ({why})")


def refuse_without(ctx: click.Context, names: list[str], *, needed: str, reason: str) -> None:
    """UsageError (exit 2, one line) naming the first of the parameters `names` the user gave
    without `needed`, the option they only apply with."""
    for name in names:
        if given(ctx, name):
            raise click.UsageError(f"{option_name(ctx, name)} needs {needed} ({reason})")


def dtype_option(choices, default: str, help: str | None = None):
    return click.option(
        "--dtype", type=click.Choice(list(choices)), default=default, show_default=True, help=help
    )


def max_new_tokens_option():
    return click.option(
        "--max-new-tokens",
        type=click.IntRange(1, MAX_NEW_TOKENS),
        default=DEFAULT_NEW_TOKENS,
        show_default=True,
        help="Tokens to generate after each prompt.",
    )


def mesh_option():
    return click.option(
        "--mesh",
        metavar="DATAxMODEL|DATAxEXPERTxMODEL",
        help="Shard the JAX model over DATA×MODEL devices, e.g. 1x8, or DATA×EXPERT×MODEL, "
        "e.g. 1x8x1 (routed experts whole per device; model_jax.sharding).",
    )


def json_option(help: str):
    return click.option("--json", "as_json", is_flag=True, help=help)
