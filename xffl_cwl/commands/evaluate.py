"""`xffl-cwl evaluate`: held-out loss of a global model, appended to the federation's history."""

from __future__ import annotations

from pathlib import Path

import click

from xffl_cwl.commands.options import settings_from, settings_options
from xffl_cwl.contract.options import DEVICES, EvaluateOptions

_path = click.Path(path_type=Path)


@click.command("evaluate")
@click.option("--model", required=True, type=_path, help="Model directory (a global model, or the initial one).")
@click.option("--dataset", type=_path, help="Held-out test set; without it only the aggregator's summary is recorded.")
@click.option("--history", type=_path, help="History so far (JSONL); its lines are copied to --out first.")
@click.option("--out", required=True, type=_path, help="History file to write: --history plus one line.")
@click.option("--round", "round_", type=int, help="Round number (default: from aggregate.json, else 0).")
@settings_options(EvaluateOptions)
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
def evaluate_command(
    model: Path, dataset: Path | None, history: Path | None, out: Path, round_: int | None, device: str, **settings
) -> None:
    """Record one round: the model's held-out loss and the aggregator's per-facility summary."""
    from xffl_cwl.contract.records import Event
    from xffl_cwl.learning.history import append_history, round_record

    evaluation = None
    if dataset is not None:
        from xffl_cwl.learning.evaluation import evaluate_model_dir

        evaluation = evaluate_model_dir(model, dataset, settings_from(EvaluateOptions, settings), device)
    record = round_record(model, evaluation, round_)
    append_history(history, out, record)
    click.echo(Event("evaluated", round=record.round, eval_loss=record.eval_loss).line())
