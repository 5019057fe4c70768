"""`xffl-cwl run`: a federation that survives its facilities, its orchestrator and its operator.

A run is one or more attempts (see attempt.py) over the same run folder. Completed rounds are
recorded (`.xffl/rounds.jsonl`), so an attempt can start from the last aggregated round with its
model, server state and history: after Ctrl-C, a crash of the machine running StreamFlow, a failure
below quorum (`--resume`), or a facility that could not be reached even after StreamFlow's retries
(at once, leaving that facility out of that round). Before an attempt, and after a stop, whatever
an earlier attempt left running (its processes, SLURM jobs in the plugin's journal) is stopped.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xffl_cwl.contract.layout import HISTORY_JSONL, OUT_DIR, RESUME_INPUTS, RESUME_STREAMFLOW, STREAMFLOW_LOG
from xffl_cwl.contract.records import RecordError, RoundRecord
from xffl_cwl.errors import InputError
from xffl_cwl.execution.attempt import Attempt, StopRequest, run_attempt
from xffl_cwl.execution.leftovers import cancel_pending_jobs, kill_group
from xffl_cwl.execution.run_folder import RunFolder, check_run_folder, read_job_order, read_run_folder
from xffl_cwl.execution.run_state import RoundDone, RunState, clear, completed_rounds, record_round, run_lock


@dataclass
class RunResult:
    ok: bool
    outdir: Path
    log: Path
    seconds: float
    history: list[RoundRecord] = field(default_factory=list)
    failure: str | None = None
    interrupted: int | None = None  # the signal that stopped the run
    resume_hint: str | None = None


def preflight(folder: RunFolder) -> None:
    """Every facility reachable and ready, or one line per problem and exit code 2, before StreamFlow starts."""
    from xffl_cwl.execution.run_folder import facility_targets
    from xffl_cwl.facility.preflight import run_checks

    targets = facility_targets(folder)
    if not any(t.kind == "slurm" for t in targets):
        return
    failed = [c for c in run_checks(targets) if c.ok is False]
    if failed:
        raise InputError(
            "; ".join(
                f"facility {c.facility}: {c.what}: {c.detail}" + (f" (fix: {c.fix})" if c.fix else "") for c in failed
            )
        )


def _yaml_text(data: Any) -> str:
    from xffl_cwl.generator.cwl_yaml import dump

    return dump(data, "Written by xffl-cwl run to resume this run folder; it is rewritten at every attempt.")


def _round_numbers(folder: RunFolder) -> tuple[int, int]:
    order = read_job_order(folder)
    rounds, first = order.get("rounds"), order.get("first_round", 1)
    if not isinstance(rounds, int) or rounds < 1:
        raise InputError(f"{folder.settings}: rounds must be an integer of at least 1, got {rounds!r}")
    if not isinstance(first, int) or not 1 <= first <= rounds + 1:
        raise InputError(f"{folder.settings}: first_round must be an integer between 1 and rounds + 1, got {first!r}")
    return first, rounds


@dataclass(frozen=True)
class _Plan:
    config: Path
    first_round: int
    start_model: str
    start_state: str | None


def _location(value: Any) -> str | None:
    return value.get("path") or value.get("location") if isinstance(value, dict) else None


def _plan(folder: RunFolder, state: RunState, last: RoundDone | None) -> _Plan:
    """The next attempt: from the folder's own inputs, or from the last completed round."""
    order = read_job_order(folder)
    first, _ = _round_numbers(folder)
    if last is None and not state.left_out:
        return _Plan(
            folder.root / folder.config_name, first, _location(order.get("model")) or "", _location(order.get("state"))
        )
    resumed = dict(order)
    if last is not None:
        resumed["first_round"] = last.round + 1
        resumed["model"] = {"class": "Directory", "path": last.model}
        resumed["history"] = {"class": "File", "path": last.history}
        if last.state:
            resumed["state"] = {"class": "Directory", "path": last.state}
        else:
            resumed.pop("state", None)
    resumed["left_out"] = list(state.left_out)
    (folder.root / RESUME_INPUTS).write_text(_yaml_text(resumed), encoding="utf-8")
    config = _read_config(folder)
    workflow = next(iter(config["workflows"].values()))
    workflow["config"]["settings"] = RESUME_INPUTS
    (folder.root / RESUME_STREAMFLOW).write_text(_yaml_text(config), encoding="utf-8")
    start = last.round + 1 if last is not None else first
    model = last.model if last is not None else _location(order.get("model")) or ""
    return _Plan(
        folder.root / RESUME_STREAMFLOW, start, model, last.state if last is not None else _location(order.get("state"))
    )


def _read_config(folder: RunFolder) -> dict[str, Any]:
    from ruamel.yaml import YAML

    return YAML(typ="safe", pure=True).load((folder.root / folder.config_name).read_text(encoding="utf-8"))


def _finish_outputs(folder: RunFolder, outdir: Path, last: RoundDone) -> None:
    """Every round was done before this attempt: the outputs are those of the last one."""
    outdir.mkdir(parents=True, exist_ok=True)
    shutil.copytree(folder.root / last.model, outdir / "model", dirs_exist_ok=True)
    if last.state:
        shutil.copytree(folder.root / last.state, outdir / "state", dirs_exist_ok=True)
    shutil.copy2(folder.root / last.history, outdir / HISTORY_JSONL)


def _describe(done: dict[int, RoundDone], last_round: int) -> str:
    finished = max((r for r in done if r > 0), default=0)
    return f"round {finished} of {last_round} done" if finished else "no round done yet"


def run(
    root: Path,
    outdir: Path | None = None,
    debug: bool = False,
    timeout: float | None = None,
    grace: float = 2.0,
    say: Callable[[str], None] = print,
    raw: Callable[[str], None] | None = None,
    check: bool = True,
    resume: bool = False,
    force: bool = False,
    stall: float = 120.0,
    stop: StopRequest | None = None,
) -> RunResult:
    """Run (or resume) the folder's federation to completion, to a reported failure, or to an interruption."""
    started = time.monotonic()
    root = Path(root).resolve()
    folder = read_run_folder(root)
    problems = check_run_folder(folder)
    if problems:
        raise InputError(f"{root}: " + "; ".join(problems) + " (xffl-cwl validate lists them)")
    first_round, last_round = _round_numbers(folder)
    outdir = Path(outdir).resolve() if outdir else root / OUT_DIR
    log = root / STREAMFLOW_LOG
    stop = stop or StopRequest()
    with run_lock(root):
        state = RunState.load(root)
        done = completed_rounds(root)
        if state is not None and force:
            say(f"--force: starting over; removing the earlier run's work, outputs and logs in {root}")
            kill_group(state.pgid)
            cancel_pending_jobs(folder, say)
            clear(root)
            state, done = None, {}
        elif state is not None and state.status == "finished":
            raise InputError(f"{root} holds a finished run ({outdir / 'model'}); start over with --force")
        elif state is not None and not resume:
            raise InputError(
                f"{root} holds a {state.status} run ({_describe(done, last_round)}); continue it with "
                f"`xffl-cwl run {root} --resume`, or start over with --force"
            )
        elif state is None and outdir.exists() and any(outdir.iterdir()):
            raise InputError(
                f"output folder {outdir} already holds an earlier run's results; remove it or pass --outdir"
            )
        if state is not None:
            if kill_group(state.pgid):
                say("stopped the StreamFlow an earlier attempt left running")
            cancel_pending_jobs(folder, say)
        state = state or RunState("running")
        if check:
            preflight(folder)
        if outdir.exists() and not (outdir / HISTORY_JSONL).exists():
            shutil.rmtree(outdir)  # a partial output of an earlier attempt: StreamFlow writes it whole at the end
        while True:
            last = done[max(done)] if done else None
            if last is not None and last.round >= last_round:
                _finish_outputs(folder, outdir, last)
                state.status, state.pgid, state.message = "finished", None, ""
                state.save(root)
                break
            plan = _plan(folder, state, last)
            state.attempt += 1
            state.status = "running"
            state.save(root)
            if plan.first_round != first_round or state.attempt > 1:
                say(
                    f"attempt {state.attempt}: from round {plan.first_round}"
                    + (f", leaving out {', '.join(state.left_out)}" if state.left_out else "")
                )

            def on_round(d: RoundDone) -> None:
                record_round(root, d)
                done[d.round] = d

            def on_start(pgid: int) -> None:
                state.pgid = pgid
                state.save(root)

            attempt = Attempt(
                folder, plan.config, plan.first_round, last_round, plan.start_model, plan.start_state, outdir, log,
                say, on_round, on_start, stop, raw, debug, timeout, grace, stall,
            )  # fmt: skip
            result = run_attempt(attempt)
            state.pgid = None
            if result.ok:
                state.status, state.message = "finished", ""
                state.save(root)
                break
            cancel_pending_jobs(folder, say)
            if result.lost is not None:
                facility, round_number, reason = result.lost
                entry = f"{facility}@{round_number}: {reason}"
                if any(e.split(":")[0] == f"{facility}@{round_number}" for e in state.left_out):
                    result.failure = f"facility {facility} failed again in round {round_number}: {reason}"
                else:
                    say(
                        f"round {round_number}: leaving {facility} out of this round and resuming from the last completed round"
                    )
                    state.left_out.append(entry)
                    continue
            state.status = "interrupted" if result.interrupted else "failed"
            state.message = result.failure or ""
            state.save(root)
            hint = f"xffl-cwl run {root} --resume"
            return RunResult(
                False,
                outdir,
                log,
                time.monotonic() - started,
                failure=result.failure,
                interrupted=result.interrupted,
                resume_hint=hint,
            )
    history_file = outdir / HISTORY_JSONL
    return RunResult(True, outdir, log, time.monotonic() - started, read_history(history_file))


def read_history(path: Path) -> list[RoundRecord]:
    """The rounds of a history file; lines that are not rounds are left out."""
    import json

    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            records.append(RoundRecord.from_json(json.loads(line)))
        except (ValueError, RecordError):
            continue
    return records


def history_table(history: list[RoundRecord]) -> str:
    """Rounds down, facilities across (their last train loss, or why they are missing), then the global held-out loss."""
    facilities = sorted(
        {name for record in history for name in record.facilities}
        | {e.facility for record in history for e in record.left_out}
        | {r.facility for record in history for r in record.rejected}
    )
    header = ["round", *facilities, "global held-out loss"]
    rows = []
    for record in history:
        cells = [str(record.round)]
        left = {e.facility for e in record.left_out}
        rejected = {r.facility for r in record.rejected}
        for name in facilities:
            info = record.facilities.get(name)
            if name in left:
                cells.append("left out")
            elif name in rejected:
                cells.append("rejected")
            else:
                cells.append("-" if info is None or info.train_loss is None else f"{info.train_loss:.4f}")
        cells.append("-" if record.eval_loss is None else f"{record.eval_loss:.4f}")
        rows.append(cells)
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True))  # noqa: E731
    notes = [f"round {r.round}: {e.facility} left out: {e.reason}" for r in history for e in r.left_out]
    notes += [f"round {r.round}: {x.facility} rejected: {x.reason}" for r in history for x in r.rejected]
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows), *notes])
