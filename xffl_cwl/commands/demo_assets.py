"""`xffl-cwl demo-assets`: a tiny model and non-IID synthetic data, built locally."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("demo-assets")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Directory to create.")
@click.option("--facilities", type=int, default=3, show_default=True, help="How many facilities get a dataset.")
@click.option("--samples", type=int, default=2000, show_default=True, help="Documents per facility.")
@click.option("--test-samples", type=int, default=100, show_default=True, help="Test documents per task.")
@click.option("--preset", type=click.Choice(["tiny", "small", "bench-400mb"]), default="tiny", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def demo_assets_command(out: Path, facilities: int, samples: int, test_samples: int, preset: str, seed: int) -> None:
    """Write model/, data/<facility>/ and data/test.jsonl under --out."""
    from xffl_cwl.learning.demo_assets import facility_names, make_demo_assets

    assets = make_demo_assets(out, facility_names(facilities), samples, test_samples, preset, seed)
    for name, task in assets.tasks.items():
        click.echo(f"{name:14s} {task:12s} {assets.datasets[name]}")
    click.echo(f"{'model':14s} {preset:12s} {assets.model}")
    click.echo(f"{'test set':14s} {'all tasks':12s} {assets.test_set}")
