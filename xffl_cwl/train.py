"""The client trainer: fine-tune the global model on one facility's data and write the update.

Full mode writes new weights with exactly the global model's tensor names, shapes, dtypes and
shard layout (so the aggregator can stream them side by side); LoRA mode writes a PEFT adapter.
Both come with `update.json`, which carries the fingerprint of the global model they started
from so the aggregator can refuse stale or foreign updates.
"""

from __future__ import annotations

import hashlib
import logging
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from xffl_cwl import __version__
from xffl_cwl.atomic import atomic_dir, check_output_dir
from xffl_cwl.data import load_texts, pack_blocks, split_blocks
from xffl_cwl.errors import InputError
from xffl_cwl.evaluation import autocast, mean_loss, pick_device
from xffl_cwl.model_dir import (
    ADAPTER_SUBDIR,
    UPDATE_JSON,
    copy_side_files,
    fingerprint,
    has_adapter,
    json_text,
)
from xffl_cwl.safetensors_stream import ShardWriter, read_checkpoint, specs_of

log = logging.getLogger(__name__)

MODES = ("full", "lora")


@dataclass
class TrainConfig:
    """Everything `xffl-cwl train` takes; defaults are those of the CLI."""

    model: Path
    dataset: Path
    out: Path
    facility: str
    round: int = 1
    local_steps: int | None = None
    epochs: float | None = None
    batch_size: int = 8
    lr: float = 1e-4
    seq_len: int = 512
    seed: int = 0
    mode: str = "full"
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    lora_dropout: float = 0.0
    precision: str = "fp32"
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    warmup_steps: int | None = None
    weight_decay: float = 0.0
    eval_fraction: float = 0.1
    text_field: str = "text"
    device: str = "auto"
    progress: bool = True

    def check(self) -> None:
        """Reject impossible settings before anything is loaded."""
        if not self.facility:
            raise InputError("--facility must not be empty")
        if self.mode not in MODES:
            raise InputError(f"--mode must be full or lora, got {self.mode!r}")
        if self.local_steps is not None and self.epochs is not None:
            raise InputError("give either --local-steps or --epochs, not both")
        if self.local_steps is not None and self.local_steps < 1:
            raise InputError(f"--local-steps must be at least 1, got {self.local_steps}")
        if self.epochs is not None and self.epochs <= 0:
            raise InputError(f"--epochs must be positive, got {self.epochs}")
        for option, value in (("--batch-size", self.batch_size), ("--grad-accum", self.grad_accum), ("--lora-r", self.lora_r)):
            if value < 1:
                raise InputError(f"{option} must be at least 1, got {value}")
        if not self.lr > 0:
            raise InputError(f"--lr must be positive, got {self.lr}")
        if self.round < 0:
            raise InputError(f"--round must be 0 or more, got {self.round}")
        if not Path(self.model).is_dir():
            raise InputError(f"--model {self.model} is not a directory; pass a Hugging Face model directory")
        check_output_dir(Path(self.out))


def _cosine_with_warmup(total: int, warmup: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _stable_seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little") & (2**63 - 1)


def _load_model(cfg: TrainConfig, base_fingerprint: str):
    """The global model (fp32 master weights), with the global adapter or a fresh one in LoRA mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(cfg.model, local_files_only=True, dtype=torch.float32)
    if cfg.mode == "full":
        if has_adapter(cfg.model):
            raise InputError(f"--model {cfg.model} carries a LoRA adapter (a FedIT federation); train it with --mode lora")
        return model
    from peft import LoraConfig, PeftModel, get_peft_model

    if has_adapter(cfg.model):
        return PeftModel.from_pretrained(model, Path(cfg.model) / ADAPTER_SUBDIR, is_trainable=True)
    # Every facility starts from the same adapter: its seed comes from the model, not the facility.
    torch.manual_seed(_stable_seed("lora-init", base_fingerprint, cfg.lora_r))
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        target_modules=list(cfg.lora_targets),
        lora_dropout=cfg.lora_dropout,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, lora)
    except ValueError as exc:
        raise InputError(f"--lora-targets {','.join(cfg.lora_targets)}: {str(exc).splitlines()[0]}") from exc


def _write_full_update(model, cfg: TrainConfig, out: Path) -> None:
    """New weights in the global model's exact layout: names, shapes, dtypes and shards."""
    ckpt = read_checkpoint(cfg.model)
    state = model.state_dict()
    for shard in ckpt.shards:
        writer = ShardWriter(out / shard.relpath, specs_of(shard.entries), shard.metadata)
        for entry in shard.entries:
            if entry.name not in state:
                raise RuntimeError(f"trained model has no tensor {entry.name!r} that the global model stores")
            writer.write(entry.name, state[entry.name].detach().to("cpu", entry.torch_dtype))
        writer.close()
    if ckpt.index_name:
        shutil.copy2(Path(cfg.model) / ckpt.index_name, out / ckpt.index_name)
    copy_side_files(cfg.model, out)


def _write_lora_update(model, out: Path) -> None:
    for config in model.peft_config.values():
        config.base_model_name_or_path = None  # a facility-local path means nothing elsewhere
    model.save_pretrained(out)
    (out / "README.md").unlink(missing_ok=True)


def _lora_summary(model) -> dict[str, Any]:
    config = next(iter(model.peft_config.values()))
    return {"r": config.r, "alpha": config.lora_alpha, "targets": sorted(config.target_modules), "dropout": config.lora_dropout}


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Fine-tune and write the update directory at `cfg.out`; returns the update.json record."""
    from tqdm import tqdm
    from transformers import AutoTokenizer

    cfg.check()
    started = time.perf_counter()
    base_fingerprint = fingerprint(cfg.model)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model, local_files_only=True)
    blocks = pack_blocks(load_texts(cfg.dataset, cfg.text_field), tokenizer, cfg.seq_len)
    # The split depends only on --seed, so "held-out" means the same blocks in every round.
    train_blocks, eval_blocks = split_blocks(blocks, cfg.eval_fraction, _stable_seed("split", cfg.seed))
    if train_blocks.shape[0] == 0:
        raise InputError(f"dataset {cfg.dataset} yields no training sequence of --seq-len {cfg.seq_len} tokens; lower --seq-len")
    device = pick_device(cfg.device)
    model = _load_model(cfg, base_fingerprint).to(device)
    per_step = cfg.batch_size * cfg.grad_accum
    steps = cfg.local_steps or max(1, math.ceil((cfg.epochs or 1.0) * train_blocks.shape[0] / per_step))
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, steps // 10)

    eval_before = mean_loss(model, eval_blocks, cfg.batch_size, device, cfg.precision)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _cosine_with_warmup(steps, warmup))
    generator = torch.Generator().manual_seed(_stable_seed("order", cfg.seed, cfg.round, cfg.facility))
    torch.manual_seed(_stable_seed("dropout", cfg.seed, cfg.round, cfg.facility))
    order = torch.randperm(train_blocks.shape[0], generator=generator)
    cursor = 0
    losses: list[float] = []
    tokens = 0
    model.train()
    train_started = time.perf_counter()
    bar = tqdm(range(steps), desc=f"{cfg.facility} round {cfg.round}", file=sys.stderr, disable=not cfg.progress, dynamic_ncols=True)
    for step in bar:
        step_loss = 0.0
        for _ in range(cfg.grad_accum):
            if cursor + cfg.batch_size > order.numel():
                order = torch.cat([order[cursor:], torch.randperm(train_blocks.shape[0], generator=generator)])
                cursor = 0
            batch = train_blocks[order[cursor : cursor + cfg.batch_size]].to(device)
            cursor += cfg.batch_size
            with autocast(device, cfg.precision):
                loss = model(input_ids=batch, labels=batch).loss / cfg.grad_accum
            loss.backward()
            step_loss += loss.item()
            tokens += batch.numel()
        if not math.isfinite(step_loss):
            raise RuntimeError(f"training diverged at step {step + 1} (loss {step_loss}); lower --lr")
        torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(step_loss)
        bar.set_postfix(loss=f"{step_loss:.4f}")
    train_seconds = time.perf_counter() - train_started
    eval_after = mean_loss(model, eval_blocks, cfg.batch_size, device, cfg.precision)

    with atomic_dir(Path(cfg.out)) as tmp:
        if cfg.mode == "full":
            _write_full_update(model, cfg, tmp)
        else:
            _write_lora_update(model, tmp)
        bytes_written = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
        record = {
            "format": "xffl-update",
            "version": 1,
            "facility": cfg.facility,
            "round": cfg.round,
            "mode": cfg.mode,
            "samples": int(train_blocks.shape[0]),
            "tokens": tokens,
            "steps": steps,
            "train_loss": {"first": losses[0], "last": losses[-1], "mean": sum(losses) / len(losses)},
            "eval_loss": {"before": eval_before, "after": eval_after},
            "eval_samples": int(eval_blocks.shape[0]),
            "wall_seconds": round(time.perf_counter() - started, 3),
            "train_seconds": round(train_seconds, 3),
            "tokens_per_second": round(tokens / train_seconds, 1) if train_seconds > 0 else None,
            "bytes_written": bytes_written,
            "base_fingerprint": base_fingerprint,
            "lora": _lora_summary(model) if cfg.mode == "lora" else None,
            "hyperparameters": {
                k: (list(v) if isinstance(v, tuple) else v)
                for k, v in asdict(cfg).items()
                if k in ("batch_size", "lr", "seq_len", "seed", "grad_accum", "max_grad_norm", "weight_decay", "precision", "eval_fraction")
            }
            | {"warmup_steps": warmup},
            "device": str(device),
            "software": {"xffl_cwl": __version__, "torch": torch.__version__},
        }
        (tmp / UPDATE_JSON).write_text(json_text(record))
    log.info("%s round %d: %d steps, loss %.4f -> %.4f", cfg.facility, cfg.round, steps, losses[0], losses[-1])
    return record

