"""`xffl-cwl check`: is every facility of a federation ready? Checked over SSH, nothing submitted."""

from __future__ import annotations

import sys
from pathlib import Path

import click


@click.command("check")
@click.argument("federation", type=click.Path(path_type=Path))
def check_command(federation: Path) -> None:
    """Log in to every facility and check sbatch, partition, container, dataset and workdir."""
    from xffl_cwl.facility.preflight import run_checks, table, targets_of
    from xffl_cwl.federation import load_federation

    checks = run_checks(targets_of(load_federation(federation)))
    click.echo(table(checks))
    failed = [c for c in checks if c.ok is False]
    if failed:
        click.echo(f"xffl-cwl check: {len(failed)} check(s) failed", err=True)
        sys.exit(1)
