"""`xffl-cwl validate`: check a run folder before running it."""

from __future__ import annotations

import sys
from pathlib import Path

import click


@click.command("validate")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--no-runners", is_flag=True, help="Skip `cwltool --validate` and `streamflow run --validate`.")
def validate_command(run_dir: Path, no_runners: bool) -> None:
    """Check bindings, inputs and the aggregate step's wiring, then ask cwltool and StreamFlow."""
    from xffl_cwl.execution.run_folder import check_run_folder, read_run_folder, step_paths

    folder = read_run_folder(run_dir)
    paths = step_paths(folder.main)
    problems = check_run_folder(folder)
    if not problems and not no_runners:
        from xffl_cwl.execution.runners import cwltool_validate, streamflow_validate

        problems = [p for p in (cwltool_validate(folder.main), streamflow_validate(folder.root)) if p]
    for problem in problems:
        click.echo(f"xffl-cwl validate: error: {run_dir}: {problem}", err=True)
    if problems:
        sys.exit(2)
    bound = sorted({d for _, d in folder.bindings})
    click.echo(f"{run_dir}: valid; {len(paths)} steps, bound to {', '.join(bound)}")
