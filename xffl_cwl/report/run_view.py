"""Everything the report and `xffl-cwl status` show about a run folder, read from its files.

It reads what the run left, in whatever state: `.xffl/` (run state, completed rounds, job
journals), each round's aggregate.json and history, the updates the aggregator received, and
StreamFlow's log (timeline.py). It writes nothing. What a facility wrote (update.json, reasons,
container names) is untrusted: read leniently here, and escaped by whoever shows it.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xffl_cwl.contract.layout import (
    AGGREGATE_JSON,
    FEDERATION_SOURCE,
    INPUTS_YML,
    MAIN_CWL,
    OUT_DIR,
    ROUND_CWL,
    STATE_DIR_NAME,
    STREAMFLOW_LOG,
    STREAMFLOW_YML,
    TOOLS_DIR,
    TRAIN_STEP_PREFIX,
    UPDATE_JSON,
)
from xffl_cwl.contract.records import PRINTABLE, RoundRecord, container_text
from xffl_cwl.execution.run_folder import RunFolder, read_job_order, read_run_folder
from xffl_cwl.execution.run_state import RoundDone, RunState, completed_rounds
from xffl_cwl.report.timeline import Job, Timeline, read_timeline

TEXT_LIMIT = 300
RECORD_LIMIT = 1 << 20


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value or abs(value) == float("inf"):
        return None
    return float(value)


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def clean_text(value: Any, limit: int = TEXT_LIMIT) -> str:
    """A facility's text, bounded, with control characters (terminal escapes among them) shown as `?`."""
    if not isinstance(value, str):
        return ""
    return "".join(c if c.isprintable() else "?" for c in value[:limit])


def _json(path: Path) -> dict[str, Any] | None:
    """A JSON object from a regular file of at most RECORD_LIMIT bytes; anything else (a link to a
    device, a FIFO, garbage, a list) is None: records come from facilities and must not hang the report."""
    try:
        info = os.lstat(path)
        if not stat.S_ISREG(info.st_mode) or info.st_size > RECORD_LIMIT:
            return None
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def dir_bytes(path: Path) -> int | None:
    """Bytes of the files under `path` (links not followed); None when it is not there."""
    if not path.exists():
        return None
    if path.is_file():
        return path.stat().st_size
    total = 0
    for base, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(base, name)).st_size
            except OSError:
                continue
    return total


class Digests:
    """sha256 of directories, remembered by (path, size, mtime) so a second report does not read GBs again."""

    def __init__(self, cache: Path | None) -> None:
        self.cache = cache
        self.known: dict[str, str] = (_json(cache) or {}) if cache else {}
        self.changed = False

    def of(self, path: Path) -> str | None:
        if not path.is_dir():
            return None
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.is_symlink())
        key = (
            str(path)
            + "|"
            + "|".join(f"{p.relative_to(path)}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
        )
        key = hashlib.sha256(key.encode()).hexdigest()
        if key in self.known:
            return self.known[key]
        digest = hashlib.sha256()
        for p in files:
            digest.update(str(p.relative_to(path)).encode() + b"\0")
            with open(p, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    digest.update(chunk)
        self.known[key] = "sha256:" + digest.hexdigest()
        self.changed = True
        return self.known[key]

    def save(self) -> None:
        if self.cache and self.changed:
            from xffl_cwl.atomic import write_text_atomic

            write_text_atomic(self.cache, json.dumps(self.known, indent=1) + "\n")


@dataclass
class FacilityRound:
    """One facility in one round: what happened to it and what it cost."""

    facility: str
    status: str  # merged | rejected | left out | training | queued | staging in | trained | failed | stopped | -
    reason: str = ""
    samples: int | None = None
    steps: int | None = None
    weight: float | None = None
    train_first: float | None = None
    train_last: float | None = None
    held_before: float | None = None
    held_after: float | None = None
    delta_norm: float | None = None
    bytes_down: int | None = None
    down_kind: str = ""  # model | change
    bytes_up: int | None = None
    encoding: str = ""
    update_digest: str | None = None
    software: dict[str, str] = field(default_factory=dict)
    container: dict[str, str] = field(default_factory=dict)
    job: Job | None = None


@dataclass
class RoundView:
    round: int
    eval_loss: float | None = None
    strategy: str | None = None
    update_norm: float | None = None
    fingerprint: str | None = None
    base_fingerprint: str | None = None
    change: dict[str, Any] | None = None  # kind, encoding, bytes
    aggregate_seconds: float | None = None
    container: dict[str, str] = field(default_factory=dict)
    facilities: dict[str, FacilityRound] = field(default_factory=dict)
    model: Path | None = None  # the global model it made (its aggregate.json is inside), once recorded
    aggregate_job: Job | None = None
    evaluate_job: Job | None = None
    complete: bool = False


@dataclass
class RunView:
    root: Path
    name: str
    status: str  # running | finished | failed | interrupted | stopped | not started
    attempt: int
    message: str
    first_round: int
    last_round: int
    facilities: list[str]
    baseline_loss: float | None
    rounds: list[RoundView]
    timeline: Timeline
    identity: list[tuple[str, str]]
    orchestrator_left_out: list[str]

    @property
    def current_round(self) -> int | None:
        """The round in progress: after the last complete one, unless the run has ended."""
        done = max((r.round for r in self.rounds if r.complete), default=self.first_round - 1)
        return done + 1 if self.status == "running" and done < self.last_round else None


def _alive(root: Path, state: RunState | None) -> bool:
    """Is an `xffl-cwl run` working on the folder now? The lock file names its pid."""
    if state is None or state.status != "running":
        return False
    try:
        pid = int((root / STATE_DIR_NAME / "lock").read_text().strip())
    except (OSError, ValueError):
        return False
    return Path(f"/proc/{pid}").exists()


def _facilities(folder: RunFolder) -> list[str]:
    names = []
    for step, _deployment in folder.bindings:
        leaf = step.rstrip("/").rsplit("/", 1)[-1]
        if leaf.startswith(TRAIN_STEP_PREFIX) and leaf[len(TRAIN_STEP_PREFIX) :] not in names:
            names.append(leaf[len(TRAIN_STEP_PREFIX) :])
    return names


def _sha256(path: Path) -> str | None:
    try:
        return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _identity(
    folder: RunFolder, view_rounds: list[RoundView], facilities: dict[str, FacilityRound]
) -> list[tuple[str, str]]:
    from importlib.metadata import PackageNotFoundError, version

    from xffl_cwl import __version__

    root = folder.root
    rows: list[tuple[str, str]] = [("run folder", str(root))]
    source = root / FEDERATION_SOURCE
    rows.append(("federation.yml", _sha256(source) or "not recorded (folder generated before xffl-cwl recorded it)"))
    workflow = hashlib.sha256()
    for path in [root / MAIN_CWL, root / ROUND_CWL, *sorted((root / TOOLS_DIR).glob("*.cwl"))]:
        workflow.update(path.name.encode() + b"\0" + (path.read_bytes() if path.is_file() else b""))
    rows.append(("workflow (main.cwl, round.cwl, tools/)", "sha256:" + workflow.hexdigest()))
    for name in (INPUTS_YML, STREAMFLOW_YML):
        rows.append((name, _sha256(root / name) or "missing"))
    rows.append(("xffl-cwl (orchestrator)", __version__))
    for package in ("streamflow", "cwl-utils", "torch", "transformers", "peft"):
        try:
            rows.append((f"{package} (orchestrator)", version(package)))
        except PackageNotFoundError:
            rows.append((f"{package} (orchestrator)", "not installed"))
    software = sorted({f"{k} {v}" for f in facilities.values() for k, v in f.software.items()})
    if software:
        rows.append(("facilities' software", ", ".join(software)))
    complete = [r for r in view_rounds if r.fingerprint]
    if complete:
        rows.append(("initial model", complete[0].base_fingerprint or "?"))
        rows.append((f"global model after round {complete[-1].round}", complete[-1].fingerprint or "?"))
    images = sorted(
        {
            f"{c.get('runtime')} {c.get('image')} {c.get('digest')} (build {c.get('build')})"
            for c in [*(r.container for r in view_rounds), *(f.container for f in facilities.values())]
            if c and c.get("runtime", "none") != "none"
        }
    )
    rows.append(("images", "; ".join(images) if images else "none (no step ran in a container)"))
    return rows


def _container(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        return {}
    return {k: value[k] for k in ("runtime", "image", "digest", "build") if container_text(value.get(k))}


def _software(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        return {}
    return {
        k[:64]: v[:64]
        for k, v in list(value.items())[:16]
        if isinstance(k, str) and isinstance(v, str) and PRINTABLE.fullmatch(k + v)
    }


def _latest(jobs: list[Job], tool: str, round_number: int, facility: str | None = None) -> Job | None:
    found = [
        j for j in jobs if j.tool == tool and j.round == round_number and (facility is None or j.facility == facility)
    ]
    return found[-1] if found else None


def _from_job(job: Job | None) -> tuple[str, str]:
    """A facility's state in a round that is not aggregated yet."""
    if job is None:
        return "-", ""
    if job.outcome == "running":
        if job.queued < 0:
            return "queued", ""
        return "training", ""
    if job.outcome == "done":
        return "trained", ""
    if job.outcome == "left_out":
        return "left out", clean_text(job.event.reason) if job.event else ""
    return job.outcome, ""


def read_run(root: Path, digests: Digests | None = None) -> RunView:
    """The run in `root` as it is now (finished, running, stopped or failed); updates are hashed with `digests`."""
    root = Path(root).resolve()
    folder = read_run_folder(root)
    order = read_job_order(folder)
    rounds_total = order.get("rounds") if isinstance(order.get("rounds"), int) else 0
    first_round = order.get("first_round") if isinstance(order.get("first_round"), int) else 1
    state = RunState.load(root) if (root / STATE_DIR_NAME).is_dir() else None
    alive = _alive(root, state)
    if state is None:
        status = "not started"
    elif state.status == "running" and not alive:
        status = "stopped"
    else:
        status = state.status
    timeline = read_timeline(folder, root / STREAMFLOW_LOG)
    if not alive:
        for job in timeline.jobs:
            if job.end is None:
                job.end, job.outcome = timeline.last_line or job.start, "stopped"
    done: dict[int, RoundDone] = completed_rounds(root) if state is not None else {}
    history: dict[int, RoundRecord] = {}
    sources = [root / d.history for _, d in sorted(done.items())]
    if (root / OUT_DIR / "history.jsonl").is_file():
        sources.append(root / OUT_DIR / "history.jsonl")
    for path in sources:
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = RoundRecord.from_json(json.loads(line))
            except ValueError:
                continue
            history[record.round] = record
    names = _facilities(folder)
    initial = order.get("model")
    initial_path = (
        Path(str(initial.get("path") or initial.get("location") or "")) if isinstance(initial, dict) else None
    )
    model_bytes: dict[int, int | None] = {first_round - 1: dir_bytes(initial_path) if initial_path else None}
    views: list[RoundView] = []
    all_facility_rounds: dict[str, FacilityRound] = {}
    for number in range(first_round, (rounds_total or 0) + 1):
        view = RoundView(number)
        record = history.get(number)
        if record is not None:
            view.eval_loss = record.eval_loss
        view.aggregate_job = _latest(timeline.jobs, "aggregate", number)
        view.evaluate_job = _latest(timeline.jobs, "evaluate", number)

        if number in done:
            view.model = root / done[number].model
            model_bytes[number] = dir_bytes(view.model)
        aggregate = _json(view.model / AGGREGATE_JSON) if view.model is not None else None
        updates: dict[str, Path] = {}
        if view.aggregate_job is not None:
            for value in view.aggregate_job.option("--update"):
                path = Path(value)
                record_json = _json(path / UPDATE_JSON)
                facility = clean_text(record_json.get("facility"), 64) if record_json else path.name
                updates[facility or path.name] = path
        if aggregate is not None:
            view.complete = True
            view.strategy = clean_text(aggregate.get("strategy"), 64) or None
            view.update_norm = _num(aggregate.get("update_norm"))
            view.fingerprint = clean_text(aggregate.get("fingerprint"), 80) or None
            view.base_fingerprint = clean_text(aggregate.get("base_fingerprint"), 80) or None
            change = aggregate.get("change")
            view.change = change if isinstance(change, dict) else None
            view.aggregate_seconds = _num(aggregate.get("seconds"))
            view.container = _container(aggregate.get("container"))
        merged = aggregate.get("facilities") if aggregate and isinstance(aggregate.get("facilities"), dict) else {}
        rejected = {
            clean_text(r.get("facility"), 64): clean_text(r.get("reason"))
            for r in (aggregate or {}).get("rejected") or []
            if isinstance(r, dict)
        }
        left_out = {
            clean_text(r.get("facility"), 64): clean_text(r.get("reason"))
            for r in (aggregate or {}).get("left_out") or []
            if isinstance(r, dict)
        }
        if record is not None:
            left_out |= {
                clean_text(e.facility, 64): clean_text(e.reason) for e in record.left_out if e.facility not in left_out
            }
        for entry in state.left_out if state else []:
            who, _, reason = entry.partition(": ")
            name, _, at = who.partition("@")
            if at == str(number):
                left_out.setdefault(name, f"{clean_text(reason.strip())} (left out by xffl-cwl run)")
        for name in names:
            job = _latest(timeline.jobs, "train", number, name)
            fr = FacilityRound(name, "-", job=job)
            info = merged.get(name) if isinstance(merged.get(name), dict) else None
            if info is not None:
                fr.status = "merged"
                fr.samples, fr.steps, fr.weight = (
                    _int(info.get("samples")),
                    _int(info.get("steps")),
                    _num(info.get("weight")),
                )
                loss = info.get("train_loss") if isinstance(info.get("train_loss"), dict) else {}
                fr.train_first, fr.train_last = _num(loss.get("first")), _num(loss.get("last"))
                held = info.get("eval_loss") if isinstance(info.get("eval_loss"), dict) else {}
                fr.held_before, fr.held_after = _num(held.get("before")), _num(held.get("after"))
                fr.delta_norm = _num(info.get("delta_norm"))
                fr.container = _container(info.get("container"))
            elif name in rejected:
                fr.status, fr.reason = "rejected", rejected[name]
            elif name in left_out:
                fr.status, fr.reason = "left out", left_out[name]
            else:
                fr.status, fr.reason = _from_job(job)
            if job is not None and job.event is not None and info is None and job.event.train_loss is not None:
                fr.train_first, fr.train_last = job.event.train_loss.first, job.event.train_loss.last
                if job.event.held_out is not None:
                    fr.held_before, fr.held_after = job.event.held_out.before, job.event.held_out.after
            if job is not None and job.argv:
                if job.option("--change"):
                    previous = views[-1].change if views else None
                    fr.down_kind, fr.bytes_down = "change", _int((previous or {}).get("bytes"))
                else:
                    fr.down_kind, fr.bytes_down = "model", model_bytes.get(number - 1)
            update = updates.get(name)
            if update is not None and fr.status != "left out":
                fr.bytes_up = dir_bytes(update)
                raw = _json(update / UPDATE_JSON) or {}
                fr.encoding = clean_text(raw.get("encoding"), 8)
                fr.software = _software(raw.get("software"))
                fr.container = fr.container or _container(raw.get("container"))
                fr.update_digest = digests.of(update) if digests is not None else None
            view.facilities[name] = fr
            all_facility_rounds[f"{name}@{number}"] = fr
        views.append(view)
    baseline = history.get(first_round - 1)
    return RunView(
        root=root,
        name=next(iter(_read_workflows(root)), root.name),
        status=status,
        attempt=state.attempt if state else 0,
        message=state.message if state else "",
        first_round=first_round,
        last_round=rounds_total or 0,
        facilities=names,
        baseline_loss=baseline.eval_loss if baseline else None,
        rounds=views,
        timeline=timeline,
        identity=_identity(folder, views, all_facility_rounds),
        orchestrator_left_out=list(state.left_out) if state else [],
    )


def _read_workflows(root: Path) -> list[str]:
    from ruamel.yaml import YAML

    try:
        config = YAML(typ="safe", pure=True).load((root / STREAMFLOW_YML).read_text(encoding="utf-8"))
        return [str(name) for name in config["workflows"]]
    except Exception:  # the name is a label; read_run_folder has already checked the file
        return []
