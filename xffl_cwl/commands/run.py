"""`xffl-cwl run`: run a run folder with StreamFlow, showing progress per round."""

from __future__ import annotations

import sys
from pathlib import Path

import click


def report(result, run_dir: Path) -> None:
    """The final table on stdout, or the failure on stderr with exit code 1."""
    from xffl_cwl.contract.layout import HISTORY_JSONL
    from xffl_cwl.execution.supervisor import history_table

    if not result.ok:
        click.echo(f"xffl-cwl run: error: {result.failure}", err=True)
        sys.exit(1)
    click.echo(history_table(result.history))
    click.echo(
        f"finished in {result.seconds:.0f} s; final model: {result.outdir / 'model'}; history: {result.outdir / HISTORY_JSONL}"
    )


@click.command("run")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option(
    "--outdir", type=click.Path(path_type=Path), help="Where the final model and history go (default RUN_DIR/out)."
)
@click.option("--timeout", type=float, help="Stop the run after this many seconds.")
@click.option(
    "--grace",
    type=float,
    default=10.0,
    show_default=True,
    help="Seconds StreamFlow gets to stop by itself after a failure.",
)
@click.option("--no-check", is_flag=True, help="Skip the SSH preflight of the SLURM facilities.")
@click.pass_context
def run_command(
    ctx: click.Context, run_dir: Path, outdir: Path | None, timeout: float | None, grace: float, no_check: bool
) -> None:
    """Run RUN_DIR/streamflow.yml; a failed facility stops the run and is named."""
    from xffl_cwl.execution.supervisor import run

    debug = bool(ctx.obj and ctx.obj.get("debug"))
    say = lambda text: click.echo(f"xffl-cwl: {text}", err=True)  # noqa: E731
    raw = (lambda text: click.echo(text, err=True)) if debug else None
    result = run(run_dir, outdir, debug=debug, timeout=timeout, grace=grace, say=say, raw=raw, check=not no_check)
    report(result, run_dir)
