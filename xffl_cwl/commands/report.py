"""`xffl-cwl report` and `xffl-cwl status`: look at a run, finished, running or stopped."""

from __future__ import annotations

import time
from pathlib import Path

import click


@click.command("report")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), help="Where the report goes (default RUN_DIR/report).")
@click.option(
    "--ro-crate",
    "crate",
    type=click.Path(path_type=Path),
    help="Also export the run as an RO-Crate (Workflow Run Crate) into this folder.",
)
def report_command(run_dir: Path, out: Path | None, crate: Path | None) -> None:
    """Write RUN_DIR/report/: plots (PNG) and index.html, a self-contained page with every round and facility."""
    from xffl_cwl.report.page import write_report

    page, view = write_report(run_dir, out)
    click.echo(f"report: {page}")
    if crate is not None:
        from xffl_cwl.report.ro_crate import export_crate

        click.echo(f"RO-Crate: {export_crate(view, crate)}")


@click.command("status")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--watch", is_flag=True, help="Refresh until the run ends (Ctrl-C to stop watching).")
@click.option(
    "--interval", type=click.FloatRange(min=0.5), default=5.0, show_default=True, help="Seconds between refreshes."
)
def status_command(run_dir: Path, watch: bool, interval: float) -> None:
    """Where RUN_DIR's run stands: the round, each facility's state and time, the last global loss."""
    from xffl_cwl.report.run_view import read_run
    from xffl_cwl.report.status import status_text

    view = read_run(run_dir)
    if not watch:
        click.echo(status_text(view))
        return
    try:
        while True:
            text = status_text(view)
            click.echo(("\033[H\033[J" if click.get_text_stream("stdout").isatty() else "") + text, nl=True)
            if view.status != "running":
                return
            time.sleep(interval)
            click.echo("")
            view = read_run(run_dir)
    except KeyboardInterrupt:
        return
