"""`xffl-cwl aggregate`: merge the facilities' updates into the next global model."""

from __future__ import annotations

import json
from pathlib import Path

import click

from xffl_cwl.errors import InputError

_dir = click.Path(path_type=Path)


def parse_betas(value: str) -> tuple[float, float]:
    try:
        b1, b2 = (float(v) for v in value.split(","))
    except ValueError as exc:
        raise InputError(f"--betas must be two comma-separated numbers like 0.9,0.99, got {value!r}") from exc
    return b1, b2


@click.command("aggregate")
@click.option("--global", "global_dir", required=True, type=_dir, help="Current global model directory.")
@click.option("--update", "updates", multiple=True, type=_dir, help="An update directory (repeat for each facility).")
@click.option("--out", required=True, type=_dir, help="Next global model directory to create (must not exist).")
@click.option("--strategy", type=click.Choice(["fedavg", "fedavgm", "fedadam", "fedyogi", "nesterov"]), default="fedavg", show_default=True)
@click.option("--server-lr", type=float, help="Server learning rate (default: fedavg/fedavgm 1.0, fedadam/fedyogi 0.01, nesterov 0.7).")
@click.option("--momentum", type=float, default=0.9, show_default=True, help="fedavgm / nesterov momentum.")
@click.option("--betas", default="0.9,0.99", show_default=True, help="fedadam / fedyogi betas.")
@click.option("--tau", type=float, default=1e-3, show_default=True, help="fedadam / fedyogi adaptivity.")
@click.option("--state", type=_dir, help="Server-optimizer state directory of the previous round.")
@click.option("--state-out", type=_dir, help="Where to write the new state (default: OUT/state).")
@click.option("--min-updates", type=int, default=1, show_default=True, help="Fail (exit 2) with fewer valid updates.")
@click.option("--lora-merge", type=click.Choice(["exact", "fedit"]), default="exact", show_default=True, help="How LoRA updates are merged.")
@click.option("--weighting", type=click.Choice(["samples", "tokens", "uniform"]), default="samples", show_default=True)
@click.option("--round", "round_", type=int, help="Round being aggregated; updates for other rounds are rejected.")
@click.option("--chunk-mb", type=float, default=4.0, show_default=True, help="Working chunk size (bounds memory).")
def aggregate_command(**opts) -> None:
    """Validate the updates and stream the next global model to --out."""
    from xffl_cwl.aggregation import AggregateConfig, aggregate

    cfg = AggregateConfig(
        global_dir=opts["global_dir"],
        updates=list(opts["updates"]),
        out=opts["out"],
        strategy=opts["strategy"],
        server_lr=opts["server_lr"],
        momentum=opts["momentum"],
        betas=parse_betas(opts["betas"]),
        tau=opts["tau"],
        state=opts["state"],
        state_out=opts["state_out"],
        min_updates=opts["min_updates"],
        lora_merge=opts["lora_merge"],
        weighting=opts["weighting"],
        round=opts["round_"],
        chunk_elems=max(1, int(opts["chunk_mb"] * 1024 * 1024 / 4)),
    )
    record = aggregate(cfg)
    click.echo(json.dumps({k: record[k] for k in ("round", "strategy", "samples", "update_norm", "rejected")}))
