"""`xffl-cwl run`: run (or resume) a run folder with StreamFlow, showing progress per round."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import click


def report(result, run_dir: Path) -> None:
    """The final table on stdout, or the failure on stderr with exit code 1 (130/143 when interrupted)."""
    from xffl_cwl.contract.layout import HISTORY_JSONL
    from xffl_cwl.execution.supervisor import history_table

    if result.interrupted:
        click.echo(f"xffl-cwl run: interrupted; nothing is left running. Resume with: {result.resume_hint}", err=True)
        sys.exit(128 + result.interrupted)
    if not result.ok:
        click.echo(f"xffl-cwl run: error: {result.failure}", err=True)
        if result.resume_hint:
            click.echo(f"xffl-cwl run: after fixing it, resume with: {result.resume_hint}", err=True)
        sys.exit(1)
    click.echo(history_table(result.history))
    click.echo(
        f"finished in {result.seconds:.0f} s; final model: {result.outdir / 'model'}; "
        f"history: {result.outdir / HISTORY_JSONL}"
    )
    click.echo(f"plots and a page of the whole run: xffl-cwl report {run_dir}")


@click.command("run")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--resume", is_flag=True, help="Continue a run that stopped, from its last aggregated round.")
@click.option("--force", is_flag=True, help="Start over: remove the earlier run's work, outputs and logs first.")
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
@click.option(
    "--stall",
    type=float,
    default=120.0,
    show_default=True,
    help="Stop when StreamFlow logs nothing for this long with nothing running.",
)
@click.option("--no-check", is_flag=True, help="Skip the SSH preflight of the SLURM facilities.")
@click.pass_context
def run_command(
    ctx: click.Context,
    run_dir: Path,
    resume: bool,
    force: bool,
    outdir: Path | None,
    timeout: float | None,
    grace: float,
    stall: float,
    no_check: bool,
) -> None:
    """Run RUN_DIR; a facility that fails is left out of its round, a run that stops can be resumed."""
    from xffl_cwl.execution.attempt import StopRequest
    from xffl_cwl.execution.supervisor import run

    debug = bool(ctx.obj and ctx.obj.get("debug"))
    say = lambda text: click.echo(f"xffl-cwl: {text}", err=True)  # noqa: E731
    raw = (lambda text: click.echo(text, err=True)) if debug else None
    stop = StopRequest()
    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        result = run(
            run_dir, outdir, debug=debug, timeout=timeout, grace=grace, say=say, raw=raw, check=not no_check,
            resume=resume, force=force, stall=stall, stop=stop,
        )  # fmt: skip
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    report(result, run_dir)
