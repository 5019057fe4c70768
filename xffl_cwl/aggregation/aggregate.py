"""The aggregator: validate client updates, then stream the next global model to disk.

Memory stays bounded by a few chunks of `chunk_elems` elements, whatever the model size and
the number of updates: every tensor is processed in row chunks, each update contributes its
chunk to a running weighted sum, and the result is appended to an output file whose header
was laid out before any data was read.
"""

from __future__ import annotations

import contextlib
import logging
import resource
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from xffl_cwl.aggregation.server_state import STATE_JSON, ServerState, load_state, state_record
from xffl_cwl.aggregation.strategies import ServerOptimizer, hyperparameters, make_strategy
from xffl_cwl.aggregation.updates import (
    Rejected,
    Update,
    check_adapter_fits,
    check_finite,
    check_same_layout,
    check_weighting,
    load_update,
)
from xffl_cwl.atomic import atomic_dir, check_output_dir
from xffl_cwl.errors import InputError
from xffl_cwl.model_dir import (
    ADAPTER_CONFIG,
    ADAPTER_STEM,
    ADAPTER_SUBDIR,
    AGGREGATE_JSON,
    MODEL_STEM,
    STATE_SUBDIR,
    combine_digests,
    copy_side_files,
    fingerprint,
    has_adapter,
    json_text,
    read_json,
)
from xffl_cwl.safetensors_stream import (
    Checkpoint,
    ShardWriter,
    TensorEntry,
    TensorReader,
    TensorSpec,
    read_checkpoint,
    row_chunks,
)

log = logging.getLogger(__name__)

LORA_MERGES = ("exact", "fedit")
WEIGHTINGS = ("samples", "tokens", "uniform")
# (start, count, current global values or None) -> the clients' weighted mean for those elements, fp32.
Target = Callable[[int, int, "torch.Tensor | None"], torch.Tensor]


@dataclass
class AggregateConfig:
    """Everything `xffl-cwl aggregate` takes; defaults are those of the CLI."""

    global_dir: Path
    updates: list[Path]
    out: Path
    strategy: str = "fedavg"
    server_lr: float | None = None
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.99)
    tau: float = 1e-3
    state: Path | None = None
    state_out: Path | None = None
    min_updates: int = 1
    lora_merge: str = "exact"
    weighting: str = "samples"
    round: int | None = None
    chunk_elems: int = 1024 * 1024


@dataclass
class TensorPlan:
    """How one output tensor gets its value: copied from `current`, or stepped towards `target`."""

    spec: TensorSpec
    current: TensorEntry | None
    target: Target | None = None


@dataclass
class OutputShard:
    relpath: str
    metadata: dict[str, str]
    plans: list[TensorPlan]


@dataclass
class Norms:
    """Squared L2 norms accumulated chunk by chunk."""

    per_facility: dict[str, float] = field(default_factory=dict)
    update: float = 0.0

    def add(self, facility: str, value: float) -> None:
        self.per_facility[facility] = self.per_facility.get(facility, 0.0) + value


def _validate(cfg: AggregateConfig) -> None:
    if not cfg.updates:
        raise InputError("no --update given; pass at least one update directory")
    if cfg.min_updates < 1:
        raise InputError(f"--min-updates must be at least 1, got {cfg.min_updates}")
    if cfg.lora_merge not in LORA_MERGES:
        raise InputError(f"--lora-merge must be exact or fedit, got {cfg.lora_merge!r}")
    if cfg.weighting not in WEIGHTINGS:
        raise InputError(f"--weighting must be one of {', '.join(WEIGHTINGS)}, got {cfg.weighting!r}")
    if not Path(cfg.global_dir).is_dir():
        raise InputError(f"--global {cfg.global_dir} is not a directory; pass the current global model directory")
    if cfg.chunk_elems < 1:
        raise InputError("chunk size must be positive")
    check_output_dir(Path(cfg.out))
    if cfg.state_out is not None:
        check_output_dir(Path(cfg.state_out), "--state-out")


def _screen(cfg: AggregateConfig, global_ckpt: Checkpoint, global_fp: str, global_adapter: Checkpoint | None, reader: TensorReader) -> tuple[list[Update], list[Rejected]]:
    """Load and check every update; the first valid one fixes the kind and the round."""
    valid: list[Update] = []
    rejected: list[Rejected] = []
    for path in cfg.updates:
        try:
            update = load_update(path)
            first = valid[0] if valid else None
            if any(u.facility == update.facility for u in valid):
                raise update.reject("a second update from the same facility")
            if first is not None and update.kind != first.kind:
                raise update.reject(f"it is a {update.kind} update, the others are {first.kind}")
            expected_round = cfg.round if cfg.round is not None else (first.round if first else None)
            if expected_round is not None and update.round != expected_round:
                raise update.reject(f"it is for round {update.round}, this aggregation is for round {expected_round}")
            if update.record.get("base_fingerprint") != global_fp:
                raise update.reject("it was trained from a different global model (base fingerprint differs from --global)")
            if cfg.weighting == "samples" and update.samples == 0:
                raise update.reject("it reports 0 training samples")
            if update.kind == "full":
                if global_adapter is not None:
                    raise update.reject("the global model carries a LoRA adapter, so updates must be LoRA adapters")
                check_same_layout(update, global_ckpt, "global model")
            else:
                check_adapter_fits(update, global_ckpt)
                reference = global_adapter or (first.checkpoint if first else None)
                if cfg.lora_merge == "fedit" and reference is not None:
                    check_same_layout(update, reference, "global adapter" if global_adapter else "first valid adapter")
            check_finite(update, reader, cfg.chunk_elems)
        except Rejected as exc:
            log.warning("%s", exc)
            rejected.append(exc)
            continue
        valid.append(update)
    return valid, rejected


def _full_target(name: str, members: list[tuple[float, Update]], reader: TensorReader, norms: Norms) -> Target:
    def target(start: int, count: int, current: torch.Tensor | None) -> torch.Tensor:
        acc = torch.zeros(count, dtype=torch.float32)
        for weight, update in members:
            values = reader.read(update.checkpoint.by_name[name], start, count).float()
            if current is not None:
                norms.add(update.facility, float(torch.sum((values - current) ** 2)))
            acc.add_(values, alpha=weight)
        return acc

    return target


def _exact_lora_target(base: TensorEntry, members: list[tuple[float, Update]], reader: TensorReader, norms: Norms) -> Target:
    """current + sum_i w_i * scale_i * B_i[rows] @ A_i: the exact mean of the clients' merged weights."""
    cols = base.shape[1]

    def target(start: int, count: int, current: torch.Tensor | None) -> torch.Tensor:
        assert current is not None
        first_row, rows = start // cols, count // cols
        acc = current.clone()
        for weight, update in members:
            module = update.modules.get(base.name)
            if module is None:
                continue
            a = reader.read(module.a).float().view(module.rank, cols)
            b = reader.read(module.b, first_row * module.rank, rows * module.rank).float().view(rows, module.rank)
            delta = (b @ a).mul_(module.scale).reshape(-1)
            norms.add(update.facility, float(torch.sum(delta**2)))
            acc.add_(delta, alpha=weight)
        return acc

    return target


def _plan_model(global_ckpt: Checkpoint, targets: dict[str, Target]) -> list[OutputShard]:
    """The global model's own layout, each tensor stepped if it has a target, copied otherwise."""
    return [
        OutputShard(
            shard.relpath,
            shard.metadata,
            [TensorPlan(TensorSpec(e.name, e.dtype, e.shape), e, targets.get(e.name) if e.is_float else None) for e in shard.entries],
        )
        for shard in global_ckpt.shards
    ]


def _plan(cfg: AggregateConfig, kind: str, global_ckpt: Checkpoint, global_adapter: Checkpoint | None, members: list[tuple[float, Update]], reader: TensorReader, norms: Norms) -> list[OutputShard]:
    if kind == "full":
        targets = {e.name: _full_target(e.name, members, reader, norms) for e in global_ckpt.entries()}
        return _plan_model(global_ckpt, targets)
    if cfg.lora_merge == "exact":
        adapted = {name for _, u in members for name in u.modules}
        targets = {name: _exact_lora_target(global_ckpt.by_name[name], members, reader, norms) for name in adapted}
        return _plan_model(global_ckpt, targets)
    # FedIT: the base is copied, the adapter's A and B are averaged separately.
    reference = global_adapter or members[0][1].checkpoint
    adapter_plans = [
        TensorPlan(
            TensorSpec(e.name, e.dtype, e.shape),
            global_adapter.by_name[e.name] if global_adapter else None,
            _full_target(e.name, members, reader, norms),
        )
        for e in reference.entries()
    ]
    shard_meta = reference.shards[0].metadata if len(reference.shards) == 1 else {"format": "pt"}
    return _plan_model(global_ckpt, {}) + [OutputShard(f"{ADAPTER_SUBDIR}/{ADAPTER_STEM}.safetensors", shard_meta, adapter_plans)]


def _stream(
    shards: list[OutputShard],
    out: Path,
    state_dir: Path | None,
    strategy: ServerOptimizer,
    old_state: ServerState,
    reader: TensorReader,
    chunk_elems: int,
    norms: Norms,
) -> tuple[dict[str, str], list[str], int]:
    """Write every output tensor and the new optimizer state; returns digests, state tensor names, bytes written."""
    stepped = [p for s in shards for p in s.plans if p.target is not None]
    names = [p.spec.name for p in stepped]
    stepped_names = set(names)
    carried = [n for n in old_state.names() if n not in stepped_names]
    slot_writers: dict[str, ShardWriter] = {}
    if state_dir is not None:
        specs = [TensorSpec(p.spec.name, "F32", p.spec.shape) for p in stepped]
        specs += [TensorSpec(n, "F32", old_state.slots[strategy.slots[0]].by_name[n].shape) for n in carried]
        slot_writers = {slot: ShardWriter(state_dir / f"{slot}.safetensors", specs) for slot in strategy.slots}
    digests: dict[str, str] = {}
    written = 0
    for shard in shards:
        (out / shard.relpath).parent.mkdir(parents=True, exist_ok=True)
        writer = ShardWriter(out / shard.relpath, [p.spec for p in shard.plans], shard.metadata)
        for plan in shard.plans:
            for start, count in row_chunks(plan.spec.shape, chunk_elems):
                stored = reader.read(plan.current, start, count) if plan.current is not None else None
                if plan.target is None:
                    writer.write(plan.spec.name, stored)
                    continue
                current = stored.float() if stored is not None else None
                mean = plan.target(start, count, current)
                state = {slot: _state_chunk(old_state, slot, plan.spec.name, start, count, reader) for slot in strategy.slots}
                new = strategy.step(current if current is not None else mean, mean, state)
                if current is not None:
                    norms.update += float(torch.sum((new - current) ** 2))
                writer.write(plan.spec.name, new.to(plan.spec.torch_dtype))
                for slot, slot_writer in slot_writers.items():
                    slot_writer.write(plan.spec.name, state[slot])
        digests[shard.relpath] = writer.close()
        written += writer.bytes_written
    for slot, slot_writer in slot_writers.items():
        for name in carried:
            entry = old_state.slots[slot].by_name[name]
            for start, count in row_chunks(entry.shape, chunk_elems):
                slot_writer.write(name, reader.read(entry, start, count))
        slot_writer.close()
        written += slot_writer.bytes_written
    return digests, names + carried, written


def _state_chunk(state: ServerState, slot: str, name: str, start: int, count: int, reader: TensorReader) -> torch.Tensor:
    """The previous round's slot values for these elements; zeros for a tensor seen for the first time."""
    ckpt = state.slots.get(slot)
    entry = ckpt.by_name.get(name) if ckpt is not None else None
    return reader.read(entry, start, count) if entry is not None else torch.zeros(count, dtype=torch.float32)


def _facility_summary(update: Update, weight: float, norm_sq: float | None) -> dict[str, Any]:
    record = update.record
    return {
        "samples": update.samples,
        "tokens": update.tokens,
        "weight": weight,
        "steps": record.get("steps"),
        "train_loss": record.get("train_loss"),
        "eval_loss": record.get("eval_loss"),
        "wall_seconds": record.get("wall_seconds"),
        "delta_norm": None if norm_sq is None else norm_sq**0.5,
    }


def aggregate(cfg: AggregateConfig) -> dict[str, Any]:
    """Write the next global model at `cfg.out` (and the optimizer state); returns the aggregate.json record."""
    started = time.perf_counter()
    _validate(cfg)
    strategy = make_strategy(cfg.strategy, cfg.server_lr, cfg.momentum, cfg.betas, cfg.tau)
    if cfg.state is not None and not strategy.slots:
        raise InputError(f"--state was given but strategy {strategy.name} keeps no state; drop --state")
    old_state = load_state(cfg.state, strategy.name, strategy.slots)
    global_dir = Path(cfg.global_dir)
    global_ckpt = read_checkpoint(global_dir, MODEL_STEM)
    global_adapter = read_checkpoint(global_dir / ADAPTER_SUBDIR, ADAPTER_STEM) if has_adapter(global_dir) else None
    global_fp = fingerprint(global_dir)

    with TensorReader() as reader:
        valid, rejected = _screen(cfg, global_ckpt, global_fp, global_adapter, reader)
        if len(valid) < cfg.min_updates:
            reasons = "; ".join(f"{r.facility}: {r.reason}" for r in rejected) or "none rejected"
            raise InputError(f"only {len(valid)} valid update(s) of {len(cfg.updates)}, --min-updates is {cfg.min_updates} ({reasons})")
        kind = valid[0].kind
        if global_adapter is not None and not (kind == "lora" and cfg.lora_merge == "fedit"):
            raise InputError(f"--global {global_dir} carries a LoRA adapter (FedIT); aggregate its updates with --lora-merge fedit")
        weights = check_weighting(valid, cfg.weighting)
        members = list(zip(weights, valid, strict=True))
        norms = Norms()
        shards = _plan(cfg, kind, global_ckpt, global_adapter, members, reader, norms)
        keeps_state = bool(strategy.slots)
        with contextlib.ExitStack() as outputs:
            out = outputs.enter_context(atomic_dir(Path(cfg.out)))
            state_dir = None
            if keeps_state and cfg.state_out is not None:
                state_dir = outputs.enter_context(atomic_dir(Path(cfg.state_out), "--state-out"))
            elif keeps_state:
                state_dir = out / STATE_SUBDIR
                state_dir.mkdir()
            digests, state_names, bytes_written = _stream(shards, out, state_dir, strategy, old_state, reader, cfg.chunk_elems, norms)
            if global_ckpt.index_name:
                shutil.copy2(global_dir / global_ckpt.index_name, out / global_ckpt.index_name)
            copy_side_files(global_dir, out)
            if kind == "lora" and cfg.lora_merge == "fedit":
                source = global_dir / ADAPTER_SUBDIR if global_adapter else valid[0].path
                config = read_json(source / ADAPTER_CONFIG, "a PEFT adapter directory")
                (out / ADAPTER_SUBDIR / ADAPTER_CONFIG).write_text(json_text(config))
            if state_dir is not None:
                record = state_record(strategy.name, old_state.step + 1, hyperparameters(strategy), strategy.slots, state_names)
                (state_dir / STATE_JSON).write_text(json_text(record))
            result = {
                "format": "xffl-aggregate",
                "version": 1,
                "round": cfg.round if cfg.round is not None else valid[0].round,
                "kind": kind,
                "strategy": strategy.name,
                "hyperparameters": hyperparameters(strategy),
                "lora_merge": cfg.lora_merge if kind == "lora" else None,
                "weighting": cfg.weighting,
                "facilities": {u.facility: _facility_summary(u, w, norms.per_facility.get(u.facility)) for w, u in members},
                "rejected": [{"facility": r.facility, "update": r.path.name, "reason": r.reason} for r in rejected],
                "samples": sum(u.samples for u in valid),
                "tokens": sum(u.tokens for u in valid),
                "update_norm": norms.update**0.5,
                "base_fingerprint": global_fp,
                "fingerprint": combine_digests(digests),
                "state_step": old_state.step + 1 if keeps_state else None,
                "bytes_read": reader.bytes_read,
                "bytes_written": bytes_written,
                "seconds": round(time.perf_counter() - started, 3),
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            }
            (out / AGGREGATE_JSON).write_text(json_text(result))
    log.info(
        "round %s: %d update(s) merged with %s, %d rejected, %.1f s",
        result["round"], len(valid), strategy.name, len(rejected), result["seconds"],
    )
    return result
