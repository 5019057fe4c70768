"""`xffl-cwl evaluate`: held-out loss of a global model, appended to the federation's history."""

from __future__ import annotations

import json
from pathlib import Path

import click

_path = click.Path(path_type=Path)


@click.command("evaluate")
@click.option("--model", required=True, type=_path, help="Model directory (a global model, or the initial one).")
@click.option("--dataset", type=_path, help="Held-out test set; without it only the aggregator's summary is recorded.")
@click.option("--history", type=_path, help="History so far (JSONL); its lines are copied to --out first.")
@click.option("--out", required=True, type=_path, help="History file to write: --history plus one line.")
@click.option("--round", "round_", type=int, help="Round number (default: from aggregate.json, else 0).")
@click.option("--seq-len", type=int, default=512, show_default=True)
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--text-field", default="text", show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
def evaluate_command(**opts) -> None:
    """Record one round: the model's held-out loss and the aggregator's per-facility summary."""
    from xffl_cwl.history import append_history, round_record

    evaluation = None
    if opts["dataset"] is not None:
        from xffl_cwl.evaluation import evaluate_model_dir

        evaluation = evaluate_model_dir(opts["model"], opts["dataset"], opts["seq_len"], opts["batch_size"], opts["device"], "fp32", opts["text_field"])
    record = round_record(opts["model"], evaluation, opts["round_"])
    append_history(opts["history"], opts["out"], record)
    click.echo(json.dumps({"round": record["round"], "eval_loss": record["eval_loss"]}))
