"""`xffl-cwl train`: one facility's local fine-tuning round."""

from __future__ import annotations

import os
from pathlib import Path

import click

from xffl_cwl.commands.options import settings_from, settings_options
from xffl_cwl.contract.layout import DEADLINE_ENV, STATUS_FILE_ENV, WORKER_ENV
from xffl_cwl.contract.options import DEVICES, TrainOptions, tool_params

_dir = click.Path(path_type=Path)


def _deadline(value: str | None) -> float | None:
    from xffl_cwl.errors import InputError

    if value in (None, "", "0"):
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < 10**9:
        raise InputError(f"--deadline must be a positive number of seconds (0: none), got {value!r:.40}")
    return seconds


@click.command("train")
@click.option("--model", required=True, type=_dir, help="Global model: a Hugging Face causal-LM directory.")
@click.option(
    "--dataset", required=True, type=_dir, help="save_to_disk directory, JSONL file, text file, or a folder of them."
)
@click.option("--out", required=True, type=_dir, help="Update directory to create (must not exist).")
@click.option(
    "--change",
    type=_dir,
    help="The aggregator's change of the global model (its change/ output): --model is then this facility's copy of "
    "the previous global model, which the change turns into this round's.",
)
@click.option(
    "--local-out",
    type=_dir,
    help="Write the round's global model (rebuilt, or --model itself, hard-linked where possible) here and train from "
    "it: the copy this facility keeps for the next round's change.",
)
@click.option("--facility", required=True, help="Name of this facility, recorded in update.json.")
@click.option("--round", "round_", type=int, default=1, show_default=True, help="Federated round number.")
@settings_options(TrainOptions)
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@click.option(
    "--nnodes",
    type=click.IntRange(1, 4096),
    default=1,
    show_default=True,
    help="Nodes the training spans (inside a SLURM allocation: srun starts the workers).",
)
@click.option(
    "--nproc-per-node",
    type=click.IntRange(1, 1024),
    default=1,
    show_default=True,
    help="Workers per node, one per GPU (on CPU, processes sharing the node).",
)
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option(
    "--status",
    type=_dir,
    default=lambda: os.environ.get(STATUS_FILE_ENV) or None,
    help=f"Record how the round ended in this file and exit 0 even if the training fails (the facility is then left "
    f"out of the round); default ${STATUS_FILE_ENV}.",
)
@click.option(
    "--deadline",
    default=lambda: os.environ.get(DEADLINE_ENV) or None,
    help=f"With --status: stop the training after this many seconds (0: never); default ${DEADLINE_ENV}.",
)
def train_command(
    model: Path,
    dataset: Path,
    out: Path,
    change: Path | None,
    local_out: Path | None,
    facility: str,
    round_: int,
    device: str,
    nnodes: int,
    nproc_per_node: int,
    no_progress: bool,
    status: Path | None,
    deadline: str | None,
    **settings,
) -> None:
    """Fine-tune the global model on this facility's data and write the update."""
    args = ["--dataset", str(dataset), "--out", str(out), "--facility", facility]
    args += ["--round", str(round_), "--device", device] + (["--no-progress"] if no_progress else [])
    for p in tool_params(TrainOptions):
        value = settings[p.name]
        if p.kind == "bool":
            args += [p.flag] if value else []
        elif value is not None:
            args += [p.flag, str(value)]
    if status is not None:  # the guarded child rebuilds the model: a failure there is the facility's round
        from xffl_cwl.learning.launcher import run_guarded

        world = ["--nnodes", str(nnodes), "--nproc-per-node", str(nproc_per_node)]
        kept = (["--change", str(change)] if change else []) + (["--local-out", str(local_out)] if local_out else [])
        code = run_guarded(
            ["--model", str(model), *kept, *args, *world],
            status,
            facility,
            round_,
            _deadline(deadline),
            out,
            click.echo,
        )
        raise SystemExit(code)
    if change is not None and local_out is None:
        from xffl_cwl.errors import InputError

        raise InputError("--change needs --local-out: the rebuilt model is written there, and trained from")
    if local_out is not None and os.environ.get(WORKER_ENV) != "1":
        from xffl_cwl.learning.model_change import rebuild

        rebuild(model, change, local_out)
        model = local_out
    args = ["--model", str(model), *args]
    if nnodes * nproc_per_node > 1 and os.environ.get(WORKER_ENV) != "1":
        from xffl_cwl.learning.workers import launch

        raise SystemExit(launch(args, nnodes, nproc_per_node))

    from xffl_cwl.contract.records import Event
    from xffl_cwl.learning.train import TrainConfig, train

    options = settings_from(TrainOptions, settings)
    cfg = TrainConfig(model, dataset, out, facility, round_, options, device, progress=not no_progress)
    r = train(cfg)
    if r is None:  # a worker other than the main one: it wrote nothing
        return
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
