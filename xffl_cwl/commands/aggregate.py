"""`xffl-cwl aggregate`: merge the facilities' updates into the next global model."""

from __future__ import annotations

import os
from pathlib import Path

import click

from xffl_cwl.commands.options import settings_from, settings_options
from xffl_cwl.contract.options import AggregateOptions
from xffl_cwl.errors import InputError

BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")

_dir = click.Path(path_type=Path)


def named_numbers(flag: str, values: tuple[str, ...]) -> dict[str, float]:
    """`NAME=NUMBER` pairs of a repeated option."""
    out: dict[str, float] = {}
    for value in values:
        name, sep, number = value.partition("=")
        try:
            out[name] = float(number) if sep and name else float("nan")
        except ValueError:
            out[name] = float("nan")
        if not sep or not name or not 0 < out[name] < float("inf"):
            raise InputError(f"{flag} {value!r:.80}: give NAME=NUMBER with a positive finite number")
    return out


@click.command("aggregate")
@click.option("--global", "global_dir", required=True, type=_dir, help="Current global model directory.")
@click.option(
    "--update",
    "updates",
    multiple=True,
    help="NAME=DIR: the update of facility NAME (repeat per facility); a bare DIR is named by its folder's name.",
)
@click.option("--out", required=True, type=_dir, help="Next global model directory to create (must not exist).")
@settings_options(AggregateOptions)
@click.option("--max-weight", multiple=True, help="NAME=N: facility NAME counts at most N samples (or tokens).")
@click.option(
    "--weight", "weights", multiple=True, help="NAME=W: fixed relative weights, instead of samples or tokens."
)
@click.option(
    "--status",
    "statuses",
    multiple=True,
    type=_dir,
    help="A train step's <facility>.status.json (repeat): a facility whose round did not end ok is left out.",
)
@click.option("--left-out", multiple=True, help="NAME@ROUND: REASON: the orchestrator left NAME out of that round.")
@click.option("--state", type=_dir, help="Server-optimizer state directory of the previous round.")
@click.option("--state-out", type=_dir, help="Where to write the new state (default: OUT/state).")
@click.option(
    "--change-out",
    type=_dir,
    help="Also write the round's change here: what a facility keeping the current model applies to rebuild the next.",
)
@click.option("--round", "round_", type=int, help="Round being aggregated; updates for other rounds are rejected.")
@click.option("--chunk-mb", type=float, default=4.0, show_default=True, help="Working chunk size (bounds memory).")
def aggregate_command(
    global_dir: Path,
    updates: tuple[str, ...],
    out: Path,
    max_weight: tuple[str, ...],
    weights: tuple[str, ...],
    statuses: tuple[Path, ...],
    left_out: tuple[str, ...],
    state: Path | None,
    state_out: Path | None,
    change_out: Path | None,
    round_: int | None,
    chunk_mb: float,
    **settings,
) -> None:
    """Validate the updates and stream the next global model to --out."""
    # The merge streams memory-bound chunks on one thread (the output's and the global model's sha256
    # run on two more); BLAS threads would only spin against the other work of a shared host.
    for variable in BLAS_THREAD_VARIABLES:
        os.environ.setdefault(variable, "1")
    from xffl_cwl.contract.records import Event
    from xffl_cwl.learning.aggregation import AggregateConfig, aggregate

    options = settings_from(AggregateOptions, settings)
    if not 0.001 <= chunk_mb <= 4096:  # also refuses NaN
        raise InputError(f"--chunk-mb must be between 0.001 and 4096, got {chunk_mb}")
    if round_ is not None and round_ < 0:
        raise InputError(f"--round must be 0 or more, got {round_}")
    chunk_elems = max(1, int(chunk_mb * 1024 * 1024 / 4))
    cfg = AggregateConfig(
        global_dir,
        list(updates),
        out,
        options,
        state,
        state_out,
        round_,
        chunk_elems,
        named_numbers("--max-weight", max_weight),
        named_numbers("--weight", weights),
        list(statuses),
        list(left_out),
        change_out,
    )
    r = aggregate(cfg)
    event = Event(
        "aggregated",
        round=r.round,
        strategy=r.strategy,
        samples=r.samples,
        update_norm=r.update_norm,
        rejected=r.rejected,
        left_out=r.left_out,
    )
    click.echo(event.line())
