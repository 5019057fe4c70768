"""The aggregator: screen the round's updates, then stream the next global model to disk.

Memory stays bounded by a few chunks of `chunk_elems` elements, whatever the model size and the
number of updates (see plans.py and streaming.py).
"""

from __future__ import annotations

import contextlib
import logging
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from xffl_cwl.atomic import atomic_dir, check_output_dir
from xffl_cwl.contract.layout import AGGREGATE_JSON, STATE_DIR
from xffl_cwl.contract.options import AggregateOptions, tool_params, tool_values
from xffl_cwl.contract.params import ParamError
from xffl_cwl.contract.records import AggregateRecord, FacilitySummary, Rejection, json_text
from xffl_cwl.errors import InputError
from xffl_cwl.learning.aggregation.plans import Members, Norms, exact_lora_plan, fedit_plan, full_plan
from xffl_cwl.learning.aggregation.screening import GlobalModel, screen
from xffl_cwl.learning.aggregation.server_state import STATE_JSON, load_state, state_record
from xffl_cwl.learning.aggregation.strategies import hyperparameters, make_strategy
from xffl_cwl.learning.aggregation.streaming import stream
from xffl_cwl.learning.aggregation.updates import Update, check_weighting
from xffl_cwl.learning.model_dir import (
    ADAPTER_CONFIG,
    ADAPTER_STEM,
    ADAPTER_SUBDIR,
    MODEL_STEM,
    combine_digests,
    copy_side_files,
    fingerprint,
    has_adapter,
    read_json,
)
from xffl_cwl.learning.safetensors_stream import TensorReader, read_checkpoint

log = logging.getLogger(__name__)


@dataclass
class AggregateConfig:
    """One `xffl-cwl aggregate` run: the global model, the updates, where to write, and the settings."""

    global_dir: Path
    updates: list[Path]
    out: Path
    options: AggregateOptions = field(default_factory=AggregateOptions)
    state: Path | None = None
    state_out: Path | None = None
    round: int | None = None
    chunk_elems: int = 1024 * 1024


def _validate(cfg: AggregateConfig) -> None:
    if not cfg.updates:
        raise InputError("no --update given; pass at least one update directory")
    values = tool_values(cfg.options)
    for p in tool_params(AggregateOptions):
        try:
            p.check(values[p.name])
        except ParamError as exc:
            raise InputError(f"{p.flag} {exc}") from None
    if not Path(cfg.global_dir).is_dir():
        raise InputError(f"--global {cfg.global_dir} is not a directory; pass the current global model directory")
    if cfg.chunk_elems < 1:
        raise InputError("chunk size must be positive")
    check_output_dir(Path(cfg.out))
    if cfg.state_out is not None:
        check_output_dir(Path(cfg.state_out), "--state-out")


def _facility_summary(update: Update, weight: float, norm_sq: float | None) -> FacilitySummary:
    r = update.record
    return FacilitySummary(
        samples=r.samples,
        tokens=r.tokens,
        weight=weight,
        steps=r.steps,
        train_loss=r.train_loss,
        eval_loss=r.eval_loss,
        wall_seconds=r.wall_seconds,
        delta_norm=None if norm_sq is None else norm_sq**0.5,
    )


def aggregate(cfg: AggregateConfig) -> AggregateRecord:
    """Write the next global model at `cfg.out` (and the optimizer state); returns the aggregate.json record."""
    started = time.perf_counter()
    _validate(cfg)
    opts = cfg.options
    strategy = make_strategy(opts)
    slots = strategy.info.slots
    if cfg.state is not None and not slots:
        raise InputError(f"--state was given but strategy {strategy.info.name} keeps no state; drop --state")
    old_state = load_state(cfg.state, strategy.info)
    global_dir = Path(cfg.global_dir)
    glob = GlobalModel(
        path=global_dir,
        checkpoint=read_checkpoint(global_dir, MODEL_STEM),
        fingerprint=fingerprint(global_dir),
        adapter=read_checkpoint(global_dir / ADAPTER_SUBDIR, ADAPTER_STEM) if has_adapter(global_dir) else None,
    )

    with TensorReader() as reader:
        valid, rejected = screen(cfg.updates, glob, opts, cfg.round, reader, cfg.chunk_elems)
        if len(valid) < opts.min_updates:
            reasons = "; ".join(f"{r.facility}: {r.reason}" for r in rejected) or "none rejected"
            raise InputError(
                f"only {len(valid)} valid update(s) of {len(cfg.updates)}, --min-updates is {opts.min_updates} ({reasons})"
            )
        mode = valid[0].mode
        fedit = mode == "lora" and opts.lora_merge == "fedit"
        if glob.adapter is not None and not fedit:
            raise InputError(
                f"--global {global_dir} carries a LoRA adapter (FedIT); aggregate its updates with --lora-merge fedit"
            )
        members: Members = list(zip(check_weighting(valid, opts.weighting), valid, strict=True))
        norms = Norms()
        planner = full_plan if mode == "full" else (fedit_plan if fedit else exact_lora_plan)
        shards = planner(glob, members, reader, norms)
        with contextlib.ExitStack() as outputs:
            out = outputs.enter_context(atomic_dir(Path(cfg.out)))
            state_dir = None
            if slots and cfg.state_out is not None:
                state_dir = outputs.enter_context(atomic_dir(Path(cfg.state_out), "--state-out"))
            elif slots:
                state_dir = out / STATE_DIR
                state_dir.mkdir()
            digests, state_names, bytes_written = stream(
                shards, out, state_dir, strategy, old_state, reader, cfg.chunk_elems, norms
            )
            if glob.checkpoint.index_name:
                shutil.copy2(global_dir / glob.checkpoint.index_name, out / glob.checkpoint.index_name)
            copy_side_files(global_dir, out)
            if fedit:
                source = global_dir / ADAPTER_SUBDIR if glob.adapter else valid[0].path
                config = read_json(source / ADAPTER_CONFIG, "a PEFT adapter directory")
                (out / ADAPTER_SUBDIR / ADAPTER_CONFIG).write_text(json_text(config))
            if state_dir is not None:
                state = state_record(
                    strategy.info.name, old_state.step + 1, hyperparameters(strategy), slots, state_names
                )
                (state_dir / STATE_JSON).write_text(json_text(state))
            record = AggregateRecord(
                round=cfg.round if cfg.round is not None else valid[0].round,
                mode=mode,
                strategy=strategy.info.name,
                hyperparameters=hyperparameters(strategy),
                lora_merge=opts.lora_merge if mode == "lora" else None,
                weighting=opts.weighting,
                facilities={
                    u.facility: _facility_summary(u, w, norms.per_facility.get(u.facility)) for w, u in members
                },
                rejected=[Rejection(r.facility, r.path.name, r.reason) for r in rejected],
                samples=sum(u.samples for u in valid),
                tokens=sum(u.tokens for u in valid),
                update_norm=norms.update**0.5,
                base_fingerprint=glob.fingerprint,
                fingerprint=combine_digests(digests),
                state_step=old_state.step + 1 if slots else None,
                bytes_read=reader.bytes_read,
                bytes_written=bytes_written,
                seconds=round(time.perf_counter() - started, 3),
                peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            )
            (out / AGGREGATE_JSON).write_text(json_text(record.to_json()))
    log.info(
        "round %s: %d update(s) merged with %s, %d rejected, %.1f s",
        record.round, len(valid), record.strategy, len(rejected), record.seconds,
    )  # fmt: skip
    return record
