"""`xffl-cwl train`: one facility's local fine-tuning round."""

from __future__ import annotations

from pathlib import Path

import click

from xffl_cwl.commands.options import settings_from, settings_options
from xffl_cwl.contract.options import DEVICES, TrainOptions

_dir = click.Path(path_type=Path)


@click.command("train")
@click.option("--model", required=True, type=_dir, help="Global model: a Hugging Face causal-LM directory.")
@click.option(
    "--dataset", required=True, type=_dir, help="save_to_disk directory, JSONL file, text file, or a folder of them."
)
@click.option("--out", required=True, type=_dir, help="Update directory to create (must not exist).")
@click.option("--facility", required=True, help="Name of this facility, recorded in update.json.")
@click.option("--round", "round_", type=int, default=1, show_default=True, help="Federated round number.")
@settings_options(TrainOptions)
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def train_command(
    model: Path, dataset: Path, out: Path, facility: str, round_: int, device: str, no_progress: bool, **settings
) -> None:
    """Fine-tune the global model on this facility's data and write the update."""
    from xffl_cwl.contract.records import Event
    from xffl_cwl.learning.train import TrainConfig, train

    options = settings_from(TrainOptions, settings)
    cfg = TrainConfig(model, dataset, out, facility, round_, options, device, progress=not no_progress)
    r = train(cfg)
    event = Event(
        "trained",
        round=r.round,
        facility=r.facility,
        steps=r.steps,
        samples=r.samples,
        train_loss=r.train_loss,
        held_out=r.eval_loss,
    )
    click.echo(event.line())
