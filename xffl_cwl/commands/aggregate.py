"""`xffl-cwl aggregate`: merge the facilities' updates into the next global model."""

from __future__ import annotations

from pathlib import Path

import click

from xffl_cwl.commands.options import settings_from, settings_options
from xffl_cwl.contract.options import AggregateOptions

_dir = click.Path(path_type=Path)


@click.command("aggregate")
@click.option("--global", "global_dir", required=True, type=_dir, help="Current global model directory.")
@click.option("--update", "updates", multiple=True, type=_dir, help="An update directory (repeat for each facility).")
@click.option("--out", required=True, type=_dir, help="Next global model directory to create (must not exist).")
@settings_options(AggregateOptions)
@click.option("--state", type=_dir, help="Server-optimizer state directory of the previous round.")
@click.option("--state-out", type=_dir, help="Where to write the new state (default: OUT/state).")
@click.option("--round", "round_", type=int, help="Round being aggregated; updates for other rounds are rejected.")
@click.option("--chunk-mb", type=float, default=4.0, show_default=True, help="Working chunk size (bounds memory).")
def aggregate_command(
    global_dir: Path,
    updates: tuple[Path, ...],
    out: Path,
    state: Path | None,
    state_out: Path | None,
    round_: int | None,
    chunk_mb: float,
    **settings,
) -> None:
    """Validate the updates and stream the next global model to --out."""
    from xffl_cwl.contract.records import Event
    from xffl_cwl.learning.aggregation import AggregateConfig, aggregate

    options = settings_from(AggregateOptions, settings)
    chunk_elems = max(1, int(chunk_mb * 1024 * 1024 / 4))
    r = aggregate(AggregateConfig(global_dir, list(updates), out, options, state, state_out, round_, chunk_elems))
    click.echo(
        Event(
            "aggregated",
            round=r.round,
            strategy=r.strategy,
            samples=r.samples,
            update_norm=r.update_norm,
            rejected=r.rejected,
        ).line()
    )
