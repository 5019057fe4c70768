"""`xffl-cwl check`: is every facility of a federation ready? Checked over SSH, nothing submitted."""

from __future__ import annotations

import sys
from pathlib import Path

import click


def facility_targets(federation: Path):
    """The facilities exactly as the generated streamflow.yml would configure them."""
    from xffl_cwl.federation import load_federation
    from xffl_cwl.federation.spec import SlurmDeployment
    from xffl_cwl.generator.streamflow_config import build_streamflow_config, is_template_file, job_order
    from xffl_cwl.preflight import targets_from_streamflow

    spec = load_federation(federation)
    config = build_streamflow_config(spec)
    for facility in spec.facilities:
        if isinstance(facility.deployment, SlurmDeployment) and is_template_file(facility.deployment.template):
            config["deployments"][facility.name]["config"]["template"] = facility.deployment.template
    bindings = config["workflows"][spec.name]["bindings"]
    return targets_from_streamflow(config, bindings, job_order(spec), Path(federation).resolve().parent, [f.name for f in spec.facilities])


@click.command("check")
@click.argument("federation", type=click.Path(path_type=Path))
def check_command(federation: Path) -> None:
    """Log in to every facility and check sbatch, partition, container, dataset and workdir."""
    from xffl_cwl.preflight import run_checks, table

    checks = run_checks(facility_targets(federation))
    click.echo(table(checks))
    failed = [c for c in checks if c.ok is False]
    if failed:
        click.echo(f"xffl-cwl check: {len(failed)} check(s) failed", err=True)
        sys.exit(1)
