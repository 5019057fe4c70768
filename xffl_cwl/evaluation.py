"""Held-out loss of a causal LM, and the device/precision choices training shares with it."""

from __future__ import annotations

import contextlib
import math

import torch

from xffl_cwl.errors import InputError


def pick_device(name: str = "auto") -> torch.device:
    """CUDA (ROCm builds answer to the same API) when present, CPU otherwise."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but torch sees no GPU; use --device auto or cpu")
    return torch.device(name)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 mixed precision keeps fp32 master weights; fp32 runs plain."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if precision != "fp32":
        raise InputError(f"--precision must be fp32 or bf16, got {precision!r}")
    return contextlib.nullcontext()


@torch.no_grad()
def mean_loss(model, blocks: torch.Tensor, batch_size: int, device: torch.device, precision: str = "fp32") -> float | None:
    """Token-weighted mean next-token cross-entropy over `blocks`, or None when there are none."""
    if blocks.shape[0] == 0:
        return None
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, blocks.shape[0], batch_size):
        batch = blocks[i : i + batch_size].to(device)
        with autocast(device, precision):
            logits = model(input_ids=batch).logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total += loss.item()
        count += batch[:, 1:].numel()
    model.train(was_training)
    value = total / count
    return value if math.isfinite(value) else float("nan")


def load_for_eval(model_dir, device: torch.device):
    """A model directory as the next round would see it: base weights plus the global adapter if any."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from xffl_cwl.model_dir import ADAPTER_SUBDIR, has_adapter

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32)
    if has_adapter(model_dir):
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, Path(model_dir) / ADAPTER_SUBDIR)
    return tokenizer, model.to(device)


def evaluate_model_dir(model_dir, dataset, seq_len: int, batch_size: int, device_name: str = "auto", precision: str = "fp32", text_field: str = "text") -> dict:
    """Held-out loss of a model directory on a whole dataset (every block is held out)."""
    from xffl_cwl.data import load_texts, pack_blocks

    device = pick_device(device_name)
    tokenizer, model = load_for_eval(model_dir, device)
    blocks = pack_blocks(load_texts(dataset, text_field), tokenizer, seq_len)
    if blocks.shape[0] == 0:
        raise InputError(f"dataset {dataset} yields no sequence of --seq-len {seq_len} tokens; lower --seq-len")
    loss = mean_loss(model, blocks, batch_size, device, precision)
    return {"loss": loss, "sequences": int(blocks.shape[0]), "tokens": int(blocks.numel())}
