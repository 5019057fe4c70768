"""`xffl-cwl generate`: federation.yml -> a run folder of CWL and StreamFlow files."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("generate")
@click.argument("federation", type=click.Path(path_type=Path))
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="Run folder to write.")
@click.option("--force", is_flag=True, help="Rewrite the generated files of an existing run folder.")
def generate_command(federation: Path, out: Path, force: bool) -> None:
    """Write main.cwl, round.cwl, tools/, inputs.yml and streamflow.yml for FEDERATION."""
    from xffl_cwl.federation import load_federation
    from xffl_cwl.generator import generate

    spec = load_federation(federation)
    written = generate(spec, out, force)
    click.echo(f"wrote {len(written)} files to {out}: {len(spec.facilities)} facilities, {spec.rounds} rounds")
    click.echo(f"next: xffl-cwl validate {out} && xffl-cwl run {out}")
