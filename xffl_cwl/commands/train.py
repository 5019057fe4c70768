"""`xffl-cwl train`: one facility's local fine-tuning round."""

from __future__ import annotations

import json
from pathlib import Path

import click

from xffl_cwl.errors import InputError

_dir = click.Path(path_type=Path)


def parse_targets(value: str) -> tuple[str, ...]:
    targets = tuple(t.strip() for t in value.split(",") if t.strip())
    if not targets:
        raise InputError("--lora-targets must name at least one module, e.g. q_proj,v_proj")
    return targets


@click.command("train")
@click.option("--model", required=True, type=_dir, help="Global model: a Hugging Face causal-LM directory.")
@click.option("--dataset", required=True, type=_dir, help="save_to_disk directory, JSONL file, text file, or a folder of them.")
@click.option("--out", required=True, type=_dir, help="Update directory to create (must not exist).")
@click.option("--facility", required=True, help="Name of this facility, recorded in update.json.")
@click.option("--round", "round_", type=int, default=1, show_default=True, help="Federated round number.")
@click.option("--local-steps", type=int, help="Optimizer steps this round (default: one epoch).")
@click.option("--epochs", type=float, help="Epochs over the local data instead of --local-steps.")
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--grad-accum", type=int, default=1, show_default=True, help="Micro-batches per optimizer step.")
@click.option("--lr", type=float, default=1e-4, show_default=True, help="Peak AdamW learning rate.")
@click.option("--warmup-steps", type=int, help="Linear warm-up steps before cosine decay (default: 10% of steps).")
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option("--max-grad-norm", type=float, default=1.0, show_default=True, help="Gradient clipping norm.")
@click.option("--seq-len", type=int, default=512, show_default=True, help="Tokens per training sequence.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--mode", type=click.Choice(["full", "lora"]), default="full", show_default=True)
@click.option("--lora-r", type=int, default=8, show_default=True)
@click.option("--lora-alpha", type=float, default=16.0, show_default=True)
@click.option("--lora-targets", default="q_proj,v_proj", show_default=True, help="Comma-separated module names.")
@click.option("--lora-dropout", type=float, default=0.0, show_default=True)
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True)
@click.option("--eval-fraction", type=float, default=0.1, show_default=True, help="Share of local data held out.")
@click.option("--text-field", default="text", show_default=True, help="Text column of the dataset.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def train_command(**opts) -> None:
    """Fine-tune the global model on this facility's data and write the update."""
    from xffl_cwl.train import TrainConfig, train

    cfg = TrainConfig(
        model=opts["model"],
        dataset=opts["dataset"],
        out=opts["out"],
        facility=opts["facility"],
        round=opts["round_"],
        local_steps=opts["local_steps"],
        epochs=opts["epochs"],
        batch_size=opts["batch_size"],
        grad_accum=opts["grad_accum"],
        lr=opts["lr"],
        warmup_steps=opts["warmup_steps"],
        weight_decay=opts["weight_decay"],
        max_grad_norm=opts["max_grad_norm"],
        seq_len=opts["seq_len"],
        seed=opts["seed"],
        mode=opts["mode"],
        lora_r=opts["lora_r"],
        lora_alpha=opts["lora_alpha"],
        lora_targets=parse_targets(opts["lora_targets"]),
        lora_dropout=opts["lora_dropout"],
        precision=opts["precision"],
        eval_fraction=opts["eval_fraction"],
        text_field=opts["text_field"],
        device=opts["device"],
        progress=not opts["no_progress"],
    )
    record = train(cfg)
    click.echo(json.dumps({k: record[k] for k in ("facility", "round", "steps", "samples", "train_loss", "eval_loss")}))
