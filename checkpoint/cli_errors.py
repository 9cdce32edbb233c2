"""One line on stderr and exit 2 for every usage error, in every command of the toolkit."""

import sys

import click


class OneLineErrors(click.Command):
    """A click command whose usage errors (bad option values, missing arguments) print
    `error: ...` on one line and exit 2, instead of click's usage block."""

    def main(self, *args, **kwargs):
        kwargs["standalone_mode"] = False
        try:
            code = super().main(*args, **kwargs)
        except click.UsageError as err:
            click.echo(f"error: {err.format_message()}", err=True)
            sys.exit(2)
        except click.Abort:
            click.echo("error: interrupted", err=True)
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)
