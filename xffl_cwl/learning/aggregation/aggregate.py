"""The aggregator: screen the round's updates, then stream the next global model to disk.

Memory stays bounded by a few chunks of `chunk_elems` elements, whatever the model size and the
number of updates (see plans.py and streaming.py). An update that turns out bad while it is
merged (non-finite values, or a change that makes the result non-finite) is rejected and the
round is written again without it; a good round reads every update once.
"""

from __future__ import annotations

import contextlib
import logging
import re
import resource
import shutil
import statistics
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from xffl_cwl.atomic import atomic_dir, check_output_dir
from xffl_cwl.contract.layout import AGGREGATE_JSON, STATE_DIR
from xffl_cwl.contract.options import AggregateOptions, tool_params, tool_values
from xffl_cwl.contract.params import ParamError
from xffl_cwl.contract.records import AggregateRecord, ChangeSummary, FacilitySummary, LeftOut, Rejection, json_text
from xffl_cwl.errors import InputError
from xffl_cwl.learning.aggregation.downlink import Downlink, LowRankDownlink, load_residual
from xffl_cwl.learning.aggregation.lora import parse_config
from xffl_cwl.learning.aggregation.plans import (
    Member,
    Norms,
    OutputShard,
    UpdateFault,
    exact_lora_plan,
    fedit_plan,
    full_plan,
)
from xffl_cwl.learning.aggregation.robust import Rule
from xffl_cwl.learning.aggregation.screening import STALE_BASE, GlobalModel, rejection, screen
from xffl_cwl.learning.aggregation.server_state import STATE_JSON, ServerState, load_state, state_record
from xffl_cwl.learning.aggregation.strategies import ServerOptimizer, hyperparameters, make_strategy
from xffl_cwl.learning.aggregation.streaming import NonFiniteOutput, stream
from xffl_cwl.learning.aggregation.updates import Update, UpdateSource, left_out_of, read_status
from xffl_cwl.learning.cpus import spare_cpus
from xffl_cwl.learning.model_change import ChangeRecord, write_adapter_change
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
from xffl_cwl.learning.provenance import current_container
from xffl_cwl.learning.safetensors_stream import Checkpoint, TensorReader, read_checkpoint

log = logging.getLogger(__name__)


@dataclass
class AggregateConfig:
    """One `xffl-cwl aggregate` run: the global model, the updates, where to write, and the settings.

    `max_weight` and `weights` come from the workflow (federation.yml), never from the updates:
    the most a facility's samples (or tokens) may count, and fixed relative weights.
    """

    global_dir: Path
    updates: list[UpdateSource | Path]
    out: Path
    options: AggregateOptions = field(default_factory=AggregateOptions)
    state: Path | None = None
    state_out: Path | None = None
    round: int | None = None
    chunk_elems: int = 1024 * 1024
    max_weight: dict[str, float] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    statuses: list[Path] = field(default_factory=list)  # <facility>.status.json of the round's train steps
    left_out: list[str] = field(default_factory=list)  # NAME@ROUND: REASON, from the orchestrator
    change_out: Path | None = None  # where to write the round's change for the facilities' copies


def _left_out(cfg: AggregateConfig, sources: list[UpdateSource]) -> tuple[list[LeftOut], list[UpdateSource]]:
    """Who is left out of this round, and why; and the updates that remain to be screened."""
    left = left_out_of(cfg.left_out, cfg.round)
    for path in cfg.statuses:
        name, status, problem = read_status(Path(path), cfg.round)
        if problem is not None:
            left.append(LeftOut(name, problem))
        elif status is not None and status.status != "ok":
            left.append(LeftOut(name, f"{status.status}: {status.reason}" if status.reason else status.status))
    names = {entry.facility for entry in left}
    for entry in left:
        log.warning("facility %r is left out of round %s: %s", entry.facility, cfg.round, entry.reason)
    return left, [s for s in sources if s.name not in names]


def _validate(cfg: AggregateConfig) -> list[UpdateSource]:
    if not cfg.updates and not cfg.statuses and not cfg.left_out:
        raise InputError("no --update given; pass at least one update directory")
    values = tool_values(cfg.options)
    for p in tool_params(AggregateOptions):
        try:
            p.check(values[p.name])
        except ParamError as exc:
            raise InputError(f"{p.flag} {exc}") from None
    for flag, table in (("--max-weight", cfg.max_weight), ("--weight", cfg.weights)):
        for name, value in table.items():
            if not (isinstance(value, int | float) and 0 < value < float("inf")):
                raise InputError(f"{flag} {name}={value!r}: must be a positive finite number")
    if not Path(cfg.global_dir).is_dir():
        raise InputError(f"--global {cfg.global_dir} is not a directory; pass the current global model directory")
    if cfg.chunk_elems < 1:
        raise InputError("chunk size must be positive")
    check_output_dir(Path(cfg.out))
    if cfg.state_out is not None:
        check_output_dir(Path(cfg.state_out), "--state-out")
    if cfg.change_out is not None:
        check_output_dir(Path(cfg.change_out), "--change-out")
    return [u if isinstance(u, UpdateSource) else UpdateSource.parse(u) for u in cfg.updates]


def _brief(reason: str, limit: int = 160) -> str:
    """A reason short enough that one line names every facility: paths by their last part."""
    text = re.sub(r"/(?:[^\s/:]+/)+([^\s/:]+)", r"\1", reason)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _quorum_error(
    valid: int, expected: int, min_updates: int, left: list[LeftOut], rejected: list[Rejection]
) -> InputError:
    reasons = [f"{e.facility}: left out, {_brief(e.reason)}" for e in left]
    reasons += [f"{r.facility}: {_brief(r.reason)}" for r in rejected]
    return InputError(
        f"only {valid} valid update(s) of {expected}, --min-updates is {min_updates} ({'; '.join(reasons) or 'none rejected'})"
    )


def _bases(cfg: AggregateConfig, valid: list[Update], rejected: list[Rejection]) -> list[tuple[Update, float, bool]]:
    """(update, raw weight, capped) for every update the workflow lets count; the others join `rejected`."""
    out = []
    for u in valid:
        if cfg.weights:
            if u.facility not in cfg.weights:
                rejected.append(rejection(u.facility, u.path, "the workflow sets weights, but none for this facility"))
                continue
            out.append((u, float(cfg.weights[u.facility]), False))
            continue
        if cfg.options.weighting == "uniform":
            out.append((u, 1.0, False))
            continue
        declared = float(u.samples if cfg.options.weighting == "samples" else u.tokens)
        cap = cfg.max_weight.get(u.facility)
        out.append((u, min(declared, cap) if cap is not None else declared, cap is not None and declared > cap))
    return out


def _clip_factors(members: list[Member], shards: list[OutputShard], bound: float, chunk_elems: int) -> dict[str, float]:
    """Per member, min(1, bound x median change / its change): one pass over every update's stepped tensors."""
    norms = {m.facility: 0.0 for m in members}
    for plan in (p for s in shards for p in s.plans if p.target is not None):
        for m in members:
            norms[m.facility] += plan.target.delta_sq(m, plan.current, chunk_elems)
    lengths = {name: value**0.5 for name, value in norms.items()}
    limit = bound * statistics.median(lengths.values())
    return {name: 1.0 if length <= limit or length == 0 else limit / length for name, length in lengths.items()}


@dataclass
class _Written:
    digests: dict[str, str]
    state_names: list[str]
    bytes_written: int
    members: list[Member]
    norms: Norms


def _downlink(
    cfg: AggregateConfig, valid: list[Update], strategy: ServerOptimizer, change_dir: Path | None, fedit: bool,
    residual: Checkpoint | None, state_dir: Path | None,
) -> Downlink | LowRankDownlink | None:  # fmt: skip
    """How the round's change is sent: none asked for; FedIT's adapter (written at the end); exact LoRA
    merged by a plain weighted mean as low-rank factors; else the encoded change of every stepped tensor."""
    if change_dir is None or fedit:
        return None
    if valid[0].mode == "lora" and cfg.options.merge == "mean" and strategy.info.name == "fedavg":
        return LowRankDownlink(change_dir, strategy.server_lr)
    return Downlink(change_dir, cfg.options.downlink, residual, state_dir)


def _merge(
    cfg: AggregateConfig, glob: GlobalModel, weighted: list[tuple[Update, float, bool]], strategy: ServerOptimizer,
    old_state: ServerState, reader: TensorReader, out: Path, state_dir: Path | None,
    downlink: Downlink | LowRankDownlink | None, background_hash: bool = True,
) -> _Written:  # fmt: skip
    opts = cfg.options
    total = sum(raw for _, raw, _ in weighted)
    members = [Member(u, raw / total) for u, raw, _ in weighted]
    mode = members[0].update.mode
    fedit = mode == "lora" and opts.lora_merge == "fedit"
    rule = Rule(opts.merge, opts.trim)
    chunk = cfg.chunk_elems if rule.kind == "mean" else max(1, cfg.chunk_elems // len(members))
    norms = Norms()
    planner = full_plan if mode == "full" else (fedit_plan if fedit else exact_lora_plan)
    shards = planner(glob, members, reader, norms, rule, chunk)
    if opts.norm_clip is not None and len(members) > 1:
        with np.errstate(over="ignore", invalid="ignore"):
            factors = _clip_factors(members, shards, opts.norm_clip, chunk)
        for m in members:
            m.clip = factors[m.facility]
    if isinstance(downlink, LowRankDownlink):
        downlink.bind(members, reader)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # non-finite values are found and blamed
        digests, state_names, written = stream(
            shards, out, state_dir, strategy, old_state, reader, chunk, norms, members, downlink, background_hash
        )
    return _Written(digests, state_names, written, members, norms)


def aggregate(cfg: AggregateConfig) -> AggregateRecord:
    """Write the next global model at `cfg.out` (and the optimizer state); returns the aggregate.json record."""
    started = time.perf_counter()
    sources = _validate(cfg)
    left, sources = _left_out(cfg, sources)
    expected = len(sources) + len(left)
    opts = cfg.options
    strategy = make_strategy(opts)
    slots = strategy.info.slots
    if cfg.state is not None and not slots and opts.downlink == "fp32":
        raise InputError(f"--state was given but strategy {strategy.info.name} keeps no state; drop --state")
    old_state = load_state(cfg.state, strategy.info)
    residual = load_residual(cfg.state)
    global_dir = Path(cfg.global_dir)
    adapter = has_adapter(global_dir)
    # Hashing (the global model's fingerprint, the output's digest) runs beside the merge only when a
    # CPU is idle for it; on a busy machine it runs in line (see learning/cpus.py).
    threads = spare_cpus() >= 2
    hashing = ThreadPoolExecutor(1, thread_name_prefix="fingerprint")
    pending: Future[str] = hashing.submit(fingerprint, global_dir) if threads else Future()
    if not threads:
        pending.set_result(fingerprint(global_dir))
    glob = GlobalModel(
        path=global_dir,
        checkpoint=read_checkpoint(global_dir, MODEL_STEM),
        pending_fingerprint=pending,
        adapter=read_checkpoint(global_dir / ADAPTER_SUBDIR, ADAPTER_STEM) if adapter else None,
        adapter_config=parse_config(read_json(global_dir / ADAPTER_SUBDIR / ADAPTER_CONFIG, "a PEFT adapter"))
        if adapter
        else None,
    )
    with TensorReader() as reader, hashing:
        valid, rejected = screen(sources, glob, opts, cfg.round, reader, cfg.chunk_elems)
        if not valid:
            raise _quorum_error(0, expected, opts.min_updates, left, rejected)
        if valid and glob.adapter is not None and not (valid[0].mode == "lora" and opts.lora_merge == "fedit"):
            raise InputError(
                f"--global {global_dir} carries a LoRA adapter (FedIT); aggregate its updates with --lora-merge fedit"
            )
        while True:
            weighted = _bases(cfg, valid, rejected)
            valid = [u for u, _, _ in weighted]
            if len(valid) < opts.min_updates or not valid:
                _drop_stale(glob, valid, rejected)  # so that the error names every reason
                raise _quorum_error(len(valid), expected, opts.min_updates, left, rejected)
            try:
                fedit = valid[0].mode == "lora" and opts.lora_merge == "fedit"
                # error feedback keeps what a lossy downlink did not send: state, even for fedavg
                keeps_state = bool(slots) or (cfg.change_out is not None and not fedit and opts.downlink != "fp32")
                with contextlib.ExitStack() as outputs:
                    out = outputs.enter_context(atomic_dir(Path(cfg.out)))
                    state_dir = None
                    if keeps_state and cfg.state_out is not None:
                        state_dir = outputs.enter_context(atomic_dir(Path(cfg.state_out), "--state-out"))
                    elif keeps_state:
                        state_dir = out / STATE_DIR
                        state_dir.mkdir()
                    change_dir = None
                    if cfg.change_out is not None:
                        change_dir = outputs.enter_context(atomic_dir(Path(cfg.change_out), "--change-out"))
                    downlink = _downlink(cfg, valid, strategy, change_dir, fedit, residual, state_dir)
                    done = _merge(cfg, glob, weighted, strategy, old_state, reader, out, state_dir, downlink, threads)
                    _reject_stale(glob, valid, rejected)
                    record = _finish(
                        cfg, glob, weighted, done, rejected, left, strategy, old_state, out, state_dir, reader, started,
                        change_dir, downlink,
                    )  # fmt: skip
                break
            except _StaleBases as exc:
                valid = [u for u in valid if u not in exc.updates]
            except UpdateFault as fault:
                if _drop_stale(glob, valid, rejected):
                    valid = [u for u in valid if not glob.stale([u])]
                    continue
                rejected.append(rejection(fault.update.facility, fault.update.path, fault.reason))
                valid = [u for u in valid if u is not fault.update]
            except NonFiniteOutput as exc:
                if _drop_stale(glob, valid, rejected):
                    valid = [u for u in valid if not glob.stale([u])]
                    continue
                raise InputError(
                    f"tensor {exc.tensor!r} of the next global model would not be finite with strategy {strategy.info.name} "
                    f"({', '.join(f'{k} {v}' for k, v in hyperparameters(strategy).items())}), and no single update causes it; "
                    "lower --server-lr, or bound the updates with --norm-clip"
                ) from None
    log.info(
        "round %s: %d update(s) merged with %s, %d rejected, %.1f s",
        record.round, len(record.facilities), record.strategy, len(record.rejected), record.seconds,
    )  # fmt: skip
    return record


class _StaleBases(Exception):
    """Updates trained from another global model: found once the fingerprint is known, after a merge."""

    def __init__(self, updates: list[Update]) -> None:
        super().__init__(", ".join(u.facility for u in updates))
        self.updates = updates


def _drop_stale(glob: GlobalModel, valid: list[Update], rejected: list[Rejection]) -> bool:
    """Reject every update trained from another global model; True if there was one."""
    stale = glob.stale(valid)
    for u in stale:
        rejected.append(rejection(u.facility, u.path, STALE_BASE))
    return bool(stale)


def _reject_stale(glob: GlobalModel, valid: list[Update], rejected: list[Rejection]) -> None:
    """After a merge: if an update claims another base, the round is written again without it."""
    stale = glob.stale(valid)
    if stale:
        _drop_stale(glob, valid, rejected)
        raise _StaleBases(stale)


def _finish(
    cfg: AggregateConfig, glob: GlobalModel, weighted: list[tuple[Update, float, bool]], done: _Written,
    rejected: list[Rejection], left: list[LeftOut], strategy: ServerOptimizer, old_state: ServerState, out: Path,
    state_dir: Path | None,
    reader: TensorReader, started: float, change_dir: Path | None = None,
    downlink: Downlink | LowRankDownlink | None = None,
) -> AggregateRecord:  # fmt: skip
    """Everything beside the weights: index, side files, the FedIT adapter config, the state record, aggregate.json."""
    opts = cfg.options
    slots = strategy.info.slots
    first = weighted[0][0]
    if glob.checkpoint.index_name:
        shutil.copy2(glob.path / glob.checkpoint.index_name, out / glob.checkpoint.index_name)
    copy_side_files(glob.path, out)
    if first.mode == "lora" and opts.lora_merge == "fedit":
        config = glob.adapter_config or first.adapter
        (out / ADAPTER_SUBDIR / ADAPTER_CONFIG).write_text(json_text(config.to_peft()))
    new_fingerprint = combine_digests(done.digests)
    change = None
    if change_dir is not None:
        kind = downlink.kind if downlink is not None else "adapter"
        encoding = downlink.sent_encoding if downlink is not None else "fp32"
        described = ChangeRecord(kind, encoding, cfg.round, glob.fingerprint, new_fingerprint)
        if downlink is not None:
            downlink.close(described)
        else:
            write_adapter_change(change_dir, out, described)
        change = ChangeSummary(kind, encoding, sum(p.stat().st_size for p in change_dir.rglob("*") if p.is_file()))
    if state_dir is not None:
        state = state_record(strategy.info.name, old_state.step + 1, hyperparameters(strategy), slots, done.state_names)
        (state_dir / STATE_JSON).write_text(json_text(state))
    clips = {m.facility: m.clip for m in done.members}
    facilities = {}
    for (u, raw, capped), m in zip(weighted, done.members, strict=True):
        r = u.record
        norm_sq = done.norms.per_facility.get(u.facility)
        facilities[u.facility] = FacilitySummary(
            samples=r.samples, tokens=r.tokens, weight=m.weight, steps=r.steps, train_loss=r.train_loss,
            eval_loss=r.eval_loss, wall_seconds=r.wall_seconds, delta_norm=None if norm_sq is None else norm_sq**0.5,
            basis=raw, capped=capped, clip=clips[u.facility], container=r.container,
        )  # fmt: skip
    record = AggregateRecord(
        round=cfg.round if cfg.round is not None else first.round,
        mode=first.mode,
        strategy=strategy.info.name,
        hyperparameters=hyperparameters(strategy)
        | {"merge": opts.merge, "norm_clip": opts.norm_clip}
        | ({"trim": opts.trim} if opts.merge == "trimmed_mean" else {}),
        lora_merge=opts.lora_merge if first.mode == "lora" else None,
        weighting=opts.weighting if not cfg.weights else "set",
        facilities=facilities,
        rejected=list(rejected),
        left_out=list(left),
        samples=sum(u.samples for u, _, _ in weighted),
        tokens=sum(u.tokens for u, _, _ in weighted),
        update_norm=done.norms.update**0.5,
        base_fingerprint=glob.fingerprint,
        fingerprint=new_fingerprint,
        state_step=old_state.step + 1 if slots else None,
        bytes_read=reader.bytes_read,
        bytes_written=done.bytes_written,
        seconds=round(time.perf_counter() - started, 3),
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        container=current_container(),
        change=change,
    )
    (out / AGGREGATE_JSON).write_text(json_text(record.to_json()))
    return record
