"""Held-out loss of a causal LM: inside a training round, and of a whole global model."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from xffl_cwl.contract.options import EvaluateOptions
from xffl_cwl.errors import InputError
from xffl_cwl.learning.devices import autocast, pick_device
from xffl_cwl.learning.model_dir import ADAPTER_SUBDIR, has_adapter


@torch.no_grad()
def mean_loss(
    model, blocks: torch.Tensor, batch_size: int, device: torch.device, precision: str = "fp32", world=None
) -> float | None:
    """Token-weighted mean next-token cross-entropy over `blocks`, or None when there are none.

    With several workers (`world`), each takes its slice of every batch of batch_size x workers
    blocks; a worker whose slice is empty still runs a forward (weighted 0), because a sharded
    model's forward is a collective."""
    if blocks.shape[0] == 0:
        return None
    size, rank = (world.size, world.rank) if world is not None else (1, 0)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    span = batch_size * size
    for i in range(0, blocks.shape[0], span):
        batch = blocks[i + rank * batch_size : min(i + (rank + 1) * batch_size, i + span, blocks.shape[0])]
        weight = 1
        if batch.shape[0] == 0:
            batch, weight = blocks[:1], 0
        batch = batch.to(device)
        with autocast(device, precision):
            logits = model(input_ids=batch).logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total += loss.item() * weight
        count += batch[:, 1:].numel() * weight
    model.train(was_training)
    if hasattr(model, "reshard"):  # a sharded model keeps its root gathered after a forward without backward
        model.reshard()
    if size > 1:
        from xffl_cwl.learning.distributed import sum_all

        total, count = sum_all([total, float(count)], world)
    value = total / count
    return value if math.isfinite(value) else float("nan")


def load_for_eval(model_dir, device: torch.device):
    """A model directory as the next round would see it: base weights plus the global adapter if any."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32)
    if has_adapter(model_dir):
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, Path(model_dir) / ADAPTER_SUBDIR)
    return tokenizer, model.to(device)


def evaluate_model_dir(model_dir, dataset, options: EvaluateOptions, device_name: str = "auto") -> dict:
    """Held-out loss of a model directory on a whole dataset (every block is held out)."""
    from xffl_cwl.learning.data import load_texts, pack_blocks

    device = pick_device(device_name)
    tokenizer, model = load_for_eval(model_dir, device)
    blocks = pack_blocks(load_texts(dataset, options.text_field), tokenizer, options.seq_len)
    if blocks.shape[0] == 0:
        raise InputError(f"dataset {dataset} yields no sequence of --seq-len {options.seq_len} tokens; lower --seq-len")
    loss = mean_loss(model, blocks, options.batch_size, device, "fp32")
    return {"loss": loss, "sequences": int(blocks.shape[0]), "tokens": int(blocks.numel())}
