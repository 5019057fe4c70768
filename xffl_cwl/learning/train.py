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
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from xffl_cwl import __version__
from xffl_cwl.atomic import atomic_dir, check_output_dir
from xffl_cwl.contract.layout import UPDATE_JSON, UPDATE_NAME
from xffl_cwl.contract.options import TrainOptions, tool_params, tool_values
from xffl_cwl.contract.params import ParamError
from xffl_cwl.contract.records import HeldOut, LoraSummary, LossSpan, UpdateRecord, finite_or_none, json_text
from xffl_cwl.errors import InputError
from xffl_cwl.learning import distributed
from xffl_cwl.learning.data import load_texts, pack_blocks, split_blocks
from xffl_cwl.learning.devices import autocast
from xffl_cwl.learning.distributed import World
from xffl_cwl.learning.evaluation import mean_loss
from xffl_cwl.learning.model_dir import ADAPTER_SUBDIR, copy_side_files, fingerprint, has_adapter
from xffl_cwl.learning.provenance import current_container
from xffl_cwl.learning.safetensors_stream import (
    ShardWriter,
    TensorReader,
    TensorSpec,
    read_checkpoint,
    specs_of,
    to_f32,
)

log = logging.getLogger(__name__)

# The settings update.json repeats, so an update says how it was trained.
RECORDED_SETTINGS = (
    "batch_size",
    "lr",
    "seq_len",
    "seed",
    "grad_accum",
    "max_grad_norm",
    "weight_decay",
    "precision",
    "eval_fraction",
)


@dataclass
class TrainConfig:
    """One `xffl-cwl train` run: where from, where to, who, which round, and the settings."""

    model: Path
    dataset: Path
    out: Path
    facility: str
    round: int = 1
    options: TrainOptions = field(default_factory=TrainOptions)
    device: str = "auto"
    progress: bool = True

    def check(self) -> None:
        """Reject impossible settings before anything is loaded."""
        if not UPDATE_NAME.fullmatch(self.facility):
            raise InputError(
                f"--facility {self.facility!r:.80} must be letters, digits, _ and - (it names the update directory), "
                "starting with a letter or digit"
            )
        values = tool_values(self.options)
        for p in tool_params(TrainOptions):
            try:
                p.check(values[p.name])
            except ParamError as exc:
                raise InputError(f"{p.flag} {exc}") from None
        if self.options.local_steps is not None and self.options.epochs is not None:
            raise InputError("give either --local-steps or --epochs, not both")
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
    if cfg.options.mode == "full":
        if has_adapter(cfg.model):
            raise InputError(
                f"--model {cfg.model} carries a LoRA adapter (a FedIT federation); train it with --mode lora"
            )
        return model
    from peft import LoraConfig, PeftModel, get_peft_model

    if has_adapter(cfg.model):
        return PeftModel.from_pretrained(model, Path(cfg.model) / ADAPTER_SUBDIR, is_trainable=True)
    # Every facility starts from the same adapter: its seed comes from the model, not the facility.
    settings = cfg.options.lora
    torch.manual_seed(_stable_seed("lora-init", base_fingerprint, settings.r))
    lora = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        target_modules=list(settings.targets),
        lora_dropout=settings.dropout,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, lora)
    except ValueError as exc:
        raise InputError(f"--lora-targets {','.join(settings.targets)}: {str(exc).splitlines()[0]}") from exc


def _write_encoded_update(model, cfg: TrainConfig, out: Path | None) -> None:
    """The change of every float weight (trained fp32 values minus the global model's), encoded.

    With a lossy encoding, what was not sent is kept in the facility's copy of the model (its
    uplink/ folder, which --local-out creates) and added to the next round's change."""
    from xffl_cwl.learning.model_change import UPLINK_DIR, UPLINK_RESIDUAL, ChangeWriter

    encoding = cfg.options.uplink
    ckpt = read_checkpoint(cfg.model)
    entries = [e for e in ckpt.entries() if e.is_float]
    uplink = Path(cfg.model) / UPLINK_DIR
    residual = None
    if (uplink / f"{UPLINK_RESIDUAL}.safetensors").is_file():
        residual = read_checkpoint(uplink, UPLINK_RESIDUAL)
        if any(residual.by_name.get(e.name) is None or residual.by_name[e.name].shape != e.shape for e in entries):
            log.warning("the uplink residual in %s does not match the model; starting without it", uplink)
            residual = None
    keep = out is not None and uplink.is_dir()
    writer = ChangeWriter(out, specs_of(entries), encoding) if out is not None else None
    kept = (
        ShardWriter(uplink / ".residual.tmp", [TensorSpec(e.name, "F32", e.shape) for e in entries], hashed=False)
        if keep
        else None
    )
    state = model.state_dict()
    with TensorReader() as reader:
        for entry in entries:
            if entry.name not in state:
                raise RuntimeError(f"trained model has no tensor {entry.name!r} that the global model stores")
            trained = distributed.full(state[entry.name].detach()).to("cpu", torch.float32).reshape(-1).numpy()
            if writer is None:
                continue
            wanted = trained - to_f32(reader.read(entry), entry.dtype)
            if residual is not None:
                wanted += reader.read(residual.by_name[entry.name])
            sent = writer.apply(entry.name, wanted, 0)
            if kept is not None:
                kept.write(entry.name, wanted - sent)
    if writer is None:
        return
    writer.close_files()
    copy_side_files(cfg.model, out)
    if kept is not None:
        kept.close()
        os.replace(uplink / ".residual.tmp", uplink / f"{UPLINK_RESIDUAL}.safetensors")


def _write_full_update(model, cfg: TrainConfig, out: Path | None) -> None:
    """New weights in the global model's exact layout: names, shapes, dtypes and shards.

    Sharded, each tensor is gathered whole, written by the main worker (`out`; None on the others)
    and freed before the next, so no worker ever holds the whole model."""
    if cfg.options.uplink != "fp32":
        _write_encoded_update(model, cfg, out)
        return
    ckpt = read_checkpoint(cfg.model)
    state = model.state_dict()
    before, highest = _rss_mib(), 0.0
    for shard in ckpt.shards:
        writer = None if out is None else ShardWriter(out / shard.relpath, specs_of(shard.entries), shard.metadata)
        for entry in shard.entries:
            if entry.name not in state:
                raise RuntimeError(f"trained model has no tensor {entry.name!r} that the global model stores")
            tensor = distributed.full(state[entry.name].detach()).to("cpu", entry.torch_dtype)
            if writer is not None:
                writer.write(entry.name, tensor)
            highest = max(highest, _rss_mib())
            del tensor
        if writer is not None:
            writer.close()
    log.info("writing the update took at most %.0f MiB more memory", max(0.0, highest - before))
    if out is None:
        return
    if ckpt.index_name:
        shutil.copy2(Path(cfg.model) / ckpt.index_name, out / ckpt.index_name)
    copy_side_files(cfg.model, out)


def _write_lora_update(model, out: Path | None, world: World) -> None:
    """The adapter in PEFT's layout; sharded, its tensors are gathered first (they are small)."""
    state = None
    if world.distributed:
        state = {k: distributed.full(v.detach()).cpu() for k, v in model.state_dict().items() if "lora_" in k}
    if out is None:
        return
    for config in model.peft_config.values():
        config.base_model_name_or_path = None  # a facility-local path means nothing elsewhere
    with warnings.catch_warnings():  # PEFT asks transformers a deprecated question while saving
        warnings.simplefilter("ignore", FutureWarning)
        model.save_pretrained(out, **({} if state is None else {"state_dict": state}))
    (out / "README.md").unlink(missing_ok=True)


def _lora_summary(model) -> LoraSummary:
    config = next(iter(model.peft_config.values()))
    return LoraSummary(config.r, config.lora_alpha, sorted(config.target_modules), config.lora_dropout)


def _rss_mib() -> float:
    """Resident memory now (the peak counter cannot show a phase that stays below an earlier peak)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


def _log_peak_memory(world: World, device) -> None:
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu = f", GPU {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB" if device.type == "cuda" else ""
    log.info("worker %d of %d: peak RSS %.0f MiB%s", world.rank, world.size, rss, gpu)


def train(cfg: TrainConfig) -> UpdateRecord | None:
    """Fine-tune and write the update directory at `cfg.out`; returns the update.json record
    (None on the workers other than the main one, which write nothing)."""
    cfg.check()
    world = distributed.world_from_env()
    device = distributed.worker_device(world, cfg.device)
    if not world.distributed:
        return _train(cfg, world, device)
    distributed.start(world, distributed.pick_backend(cfg.options.backend, device), device)
    try:
        return _train(cfg, world, device)
    finally:
        distributed.stop()


def _train(cfg: TrainConfig, world: World, device) -> UpdateRecord | None:
    from tqdm import tqdm
    from transformers import AutoTokenizer

    opts = cfg.options
    started = time.perf_counter()
    base_fingerprint = fingerprint(cfg.model)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model, local_files_only=True)
    blocks = pack_blocks(load_texts(cfg.dataset, opts.text_field), tokenizer, opts.seq_len)
    # The split depends only on --seed, so "held-out" means the same blocks in every round.
    train_blocks, eval_blocks = split_blocks(blocks, opts.eval_fraction, _stable_seed("split", opts.seed))
    if train_blocks.shape[0] == 0:
        raise InputError(
            f"dataset {cfg.dataset} yields no training sequence of --seq-len {opts.seq_len} tokens; lower --seq-len"
        )
    model = _load_model(cfg, base_fingerprint)
    (model.get_base_model() if hasattr(model, "get_base_model") else model).config.use_cache = False  # training
    if opts.activation_checkpointing:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    sharding = "none"
    if world.distributed:
        sharding = distributed.shard(model, world, opts.sharding, opts.precision, device)
    else:
        model = model.to(device)
    # Mixed precision of a sharded model is FSDP's policy; a single process autocasts.
    precision = "fp32" if world.distributed else opts.precision
    # The global batch is batch_size x workers x grad_accum: the same samples in the same order
    # for a given seed whatever the number of workers, each worker taking its slice.
    span = opts.batch_size * world.size
    per_step = span * opts.grad_accum
    steps = opts.local_steps or max(1, math.ceil((opts.epochs or 1.0) * train_blocks.shape[0] / per_step))
    warmup = opts.warmup_steps if opts.warmup_steps is not None else max(1, steps // 10)

    # The optimizer takes the (sharded) parameters before any forward pass has gathered them.
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=opts.lr, weight_decay=opts.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _cosine_with_warmup(steps, warmup))
    eval_before = mean_loss(model, eval_blocks, opts.batch_size, device, precision, world)
    generator = torch.Generator().manual_seed(_stable_seed("order", opts.seed, cfg.round, cfg.facility))
    torch.manual_seed(_stable_seed("dropout", opts.seed, cfg.round, cfg.facility))
    order = torch.randperm(train_blocks.shape[0], generator=generator)
    cursor = 0
    losses: list[float] = []
    tokens = 0
    model.train()
    train_started = time.perf_counter()
    bar = tqdm(
        range(steps),
        desc=f"{cfg.facility} round {cfg.round}",
        file=sys.stderr,
        disable=not cfg.progress or not world.main,
        dynamic_ncols=True,
    )
    for step in bar:
        step_loss = 0.0
        for _ in range(opts.grad_accum):
            while cursor + span > order.numel():
                order = torch.cat([order[cursor:], torch.randperm(train_blocks.shape[0], generator=generator)])
                cursor = 0
            mine = order[cursor + world.rank * opts.batch_size : cursor + (world.rank + 1) * opts.batch_size]
            batch = train_blocks[mine].to(device)
            cursor += span
            with autocast(device, precision):
                loss = model(input_ids=batch, labels=batch).loss / opts.grad_accum
            loss.backward()
            step_loss += loss.item()
            tokens += batch.numel() * world.size
        if world.distributed:
            step_loss = distributed.sum_all([step_loss], world)[0] / world.size
        if not math.isfinite(step_loss):
            raise RuntimeError(f"training diverged at step {step + 1} (loss {step_loss}); lower --lr")
        torch.nn.utils.clip_grad_norm_(trainable, opts.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(step_loss)
        bar.set_postfix(loss=f"{step_loss:.4f}")
    train_seconds = time.perf_counter() - train_started
    eval_after = mean_loss(model, eval_blocks, opts.batch_size, device, precision, world)

    if not world.main:
        if opts.mode == "full":
            _write_full_update(model, cfg, None)
        else:
            _write_lora_update(model, None, world)
        distributed.barrier(world)
        _log_peak_memory(world, device)
        return None
    with atomic_dir(Path(cfg.out)) as tmp:
        if opts.mode == "full":
            _write_full_update(model, cfg, tmp)
        else:
            _write_lora_update(model, tmp, world)
        bytes_written = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
        values = tool_values(opts)
        record = UpdateRecord(
            facility=cfg.facility,
            round=cfg.round,
            mode=opts.mode,
            samples=int(train_blocks.shape[0]),
            tokens=tokens,
            steps=steps,
            train_loss=LossSpan(losses[0], losses[-1], sum(losses) / len(losses)),
            eval_loss=HeldOut(finite_or_none(eval_before), finite_or_none(eval_after)),
            base_fingerprint=base_fingerprint,
            eval_samples=int(eval_blocks.shape[0]),
            wall_seconds=round(time.perf_counter() - started, 3),
            train_seconds=round(train_seconds, 3),
            tokens_per_second=round(tokens / train_seconds, 1) if train_seconds > 0 else None,
            bytes_written=bytes_written,
            lora=_lora_summary(model) if opts.mode == "lora" else None,
            hyperparameters={k: values[k] for k in RECORDED_SETTINGS}
            | {"warmup_steps": warmup, "workers": world.size, "global_batch": per_step, "sharding": sharding},
            device=str(device),
            software={"xffl_cwl": __version__, "torch": torch.__version__},
            container=current_container(),
            encoding=opts.uplink if opts.mode == "full" else "fp32",
        )
        (tmp / UPDATE_JSON).write_text(json_text(record.to_json()))
    distributed.barrier(world)
    log.info("%s round %d: %d steps, loss %.4f -> %.4f", cfg.facility, cfg.round, steps, losses[0], losses[-1])
    _log_peak_memory(world, device)
    return record
