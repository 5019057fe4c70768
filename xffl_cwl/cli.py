"""The `xffl-cwl` command. Subcommands import torch and friends only when they run."""

from __future__ import annotations

import logging
import signal
import sys

import click

from xffl_cwl import __version__, offline
from xffl_cwl.commands import COMMANDS
from xffl_cwl.errors import InputError


class XfflGroup(click.Group):
    """Turns an InputError anywhere below into one line on stderr and exit code 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except InputError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            sub = ctx.invoked_subcommand or ""
            click.echo(f"xffl-cwl {sub}: error: {exc}".replace("  ", " "), err=True)
            sys.exit(exc.exit_code)


@click.group(cls=XfflGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--debug", is_flag=True, help="Show debug logs, full tracebacks and raw runner output.")
@click.version_option(__version__, prog_name="xffl-cwl")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Federated fine-tuning of LLMs across HPC facilities, as a CWL workflow run by StreamFlow."""
    offline.configure()
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s" if debug else "xffl-cwl: %(message)s",
        stream=sys.stderr,
    )
    if not debug:
        logging.getLogger("asyncssh").setLevel(logging.WARNING)


for command in COMMANDS:
    cli.add_command(command)


def _terminated(signum: int, _frame) -> None:
    """SIGTERM (scancel, a runner's timeout, a supervisor) unwinds like Ctrl-C: temporary outputs are removed."""
    raise SystemExit(128 + signum)


def main() -> None:
    signal.signal(signal.SIGTERM, _terminated)
    cli(prog_name="xffl-cwl")


if __name__ == "__main__":
    main()
