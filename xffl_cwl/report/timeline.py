"""When each job of a run did what, from StreamFlow's log and the plugin's job journal.

A train job's round is: staging in (StreamFlow's copies to the facility before the job starts),
queue wait (SLURM's submit to start, from the journal; none for a local deployment), training (the
rest of the job), staging out (the copies from the facility to the aggregator before the round's
aggregation). The aggregator's jobs are aggregation and evaluation. Every time is seconds since
the epoch; a job still running has no end.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from xffl_cwl.contract.layout import AGGREGATOR, STATE_DIR_NAME, WORK_DIR, tool_of_step
from xffl_cwl.contract.records import Event
from xffl_cwl.execution.run_folder import RunFolder
from xffl_cwl.execution.streamflow_log import EXECUTING, FAILED_JOB, LINE

COPY = re.compile(
    r"^(?P<verb>COPYING|COMPLETED copy) from (?P<src>\S+)(?: on (?:location (?P<sloc>\S+)|local file-system))?"
    r" to (?P<dst>\S+) on (?:location (?P<dloc>\S+)|local file-system|locations:)$"
)
ROUND_FLAG = "--round"


@dataclass
class Copy:
    src: str
    dst: str
    src_deployment: str | None
    dst_deployment: str | None
    start: float
    end: float | None = None


@dataclass
class Job:
    """One run of a tool: a facility's training, an aggregation, an evaluation (the baseline's is round 0)."""

    tool: str  # train | aggregate | evaluate
    deployment: str | None
    round: int | None
    facility: str | None
    directory: str | None
    argv: list[str]
    start: float
    end: float | None = None
    outcome: str = "running"  # running | done | left_out | failed | stopped
    event: Event | None = None
    stage_in: tuple[float, float] | None = None
    stage_out: tuple[float, float] | None = None
    queued: float = 0.0  # SLURM's queue wait, inside [start, end]
    slurm: dict = field(default_factory=dict)  # the journal's entries for this job

    def option(self, flag: str) -> list[str]:
        """Every value given to `flag` on the tool's command line."""
        return [self.argv[i + 1] for i, word in enumerate(self.argv[:-1]) if word == flag]

    @property
    def seconds(self) -> float | None:
        return None if self.end is None else self.end - self.start


@dataclass
class Timeline:
    jobs: list[Job]
    copies: list[Copy]
    started: float | None  # the first attempt's start
    last_line: float | None  # the log's latest timestamp


def timestamp(text: str) -> float:
    """The log's local time as seconds since the epoch."""
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S.%f").timestamp()


def _round_of(argv: list[str]) -> int | None:
    for i, word in enumerate(argv[:-1]):
        if word == ROUND_FLAG and argv[i + 1].isdigit():
            return int(argv[i + 1])
    return None


def _argv(lines: list[str]) -> list[str]:
    text = "\n".join(lines).replace("\\\n", " ")
    try:
        return shlex.split(text)
    except ValueError:
        return text.split()


class _Reader:
    def __init__(self, folder: RunFolder) -> None:
        self.folder = folder
        self.work = Path(os.path.abspath(folder.root / WORK_DIR))
        self.locations: dict[str, str] = {}  # a remote location's name -> its deployment
        self.jobs: list[Job] = []
        self.copies: list[Copy] = []
        self.open_copies: dict[tuple[str, str], Copy] = {}
        self.started: float | None = None
        self.last: float | None = None
        self._command: tuple[Job, list[str]] | None = None

    def deployment_of_path(self, path: str, location: str | None) -> str | None:
        if location is not None:  # StreamFlow names a location <deployment>/<name>
            head = location.split("/", 1)[0]
            return head if head in self.folder.deployments else self.locations.get(location, location)
        try:
            relative = Path(os.path.abspath(path)).relative_to(self.work)  # not resolved: staged inputs are links
        except ValueError:
            return None  # an input from outside the run folder: the user's data or model
        return relative.parts[0] if relative.parts else None

    def stop_open(self, at: float | None) -> None:
        for job in self.jobs:
            if job.end is None:
                job.end, job.outcome = (at if at is not None else job.start), "stopped"

    def open_job(self, predicate) -> Job | None:
        return next((j for j in reversed(self.jobs) if j.end is None and predicate(j)), None)

    def feed(self, line: str) -> None:
        match = LINE.match(line.rstrip("\n"))
        if not match:
            stripped = line.strip()
            if self._command is not None and not stripped.startswith("{"):
                self._command[1].append(stripped)
                return
            self._finish_command()
            if stripped.startswith("{"):
                self._event(stripped, self.last)
            return
        self._finish_command()
        at = timestamp(line[:23])
        previous, self.last = self.last, at
        message = match["message"].strip()
        if message.startswith("EXECUTING workflow"):
            self.started = at if self.started is None else self.started
            self.stop_open(previous)  # a new attempt: what the last one left open was stopped with it
        elif m := EXECUTING.match(message):
            deployment = self.folder.deployment_of(m["step"])
            if m["location"] and deployment:
                self.locations[m["location"]] = deployment
            job = Job(tool_of_step(m["step"]), deployment, None, None, m["directory"], [], at)
            self.jobs.append(job)
            self._command = (job, [])
        elif m := COPY.match(message):
            src_dep = self.deployment_of_path(m["src"], m["sloc"])
            dst_dep = self.deployment_of_path(m["dst"], m["dloc"])
            key = (m["src"], m["dst"])
            if m["verb"] == "COPYING":
                copy = Copy(m["src"], m["dst"], src_dep, dst_dep, at)
                self.copies.append(copy)
                self.open_copies[key] = copy
            elif key in self.open_copies:
                self.open_copies.pop(key).end = at
        elif m := FAILED_JOB.match(message):
            step = m["job"].rsplit("/", 1)[0]
            job = self.open_job(
                lambda j: j.tool == tool_of_step(step) and j.deployment == self.folder.deployment_of(step)
            )
            if job is not None:
                job.end, job.outcome = at, "failed"
        elif message.startswith("{"):
            self._event(message, at)

    def _finish_command(self) -> None:
        if self._command is None:
            return
        job, lines = self._command
        self._command = None
        job.argv = _argv(lines)
        job.round = _round_of(job.argv)
        if job.tool == "train":
            facility = job.option("--facility")
            job.facility = facility[0] if facility else job.deployment

    def _event(self, text: str, at: float | None) -> None:
        event = Event.parse(text)
        if event is None or at is None:
            return
        tool = {"trained": "train", "left_out": "train", "aggregated": "aggregate", "evaluated": "evaluate"}[
            event.event
        ]
        job = self.open_job(
            lambda j: (
                j.tool == tool and (tool != "train" or j.facility == event.facility) and j.round in (event.round, None)
            )  # evaluate learns its round from the history it extends
        )
        if job is not None:
            job.end, job.event = at, event
            job.round = event.round if job.round is None else job.round
            job.outcome = "left_out" if event.event == "left_out" else "done"


def _span(copies: list[Copy]) -> tuple[float, float] | None:
    if not copies:
        return None
    return min(c.start for c in copies), max(c.end if c.end is not None else c.start for c in copies)


def _attach_copies(jobs: list[Job], copies: list[Copy]) -> None:
    """Staging in: the copies to a facility since its previous job; staging out: its copies to the aggregator."""
    trains = sorted((j for j in jobs if j.tool == "train"), key=lambda j: j.start)
    aggregations = sorted((j for j in jobs if j.tool == "aggregate"), key=lambda j: j.start)
    previous_end: dict[str | None, float] = {}
    for job in trains:
        since = previous_end.get(job.deployment, float("-inf"))
        job.stage_in = _span([c for c in copies if c.dst_deployment == job.deployment and since < c.start <= job.start])
        previous_end[job.deployment] = job.end if job.end is not None else job.start
        if job.end is None:
            continue
        until = next((a.start for a in aggregations if a.start >= job.end), float("inf"))
        job.stage_out = _span(
            [
                c
                for c in copies
                if c.src_deployment == job.deployment and c.dst_deployment == AGGREGATOR and job.end <= c.start <= until
            ]
        )


def _attach_journal(folder: RunFolder, jobs: list[Job]) -> None:
    """SLURM's queue wait of each train job, from the xffl-facility plugin's journal."""
    for path in sorted((folder.root / STATE_DIR_NAME / "jobs").glob("*.jsonl")):
        entries: dict[str, dict] = {}
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and isinstance(entry.get("job_id"), str):
                entries.setdefault(entry["job_id"], {})[str(entry.get("event"))] = entry
        deployment = path.stem
        for job in (j for j in jobs if j.tool == "train" and j.deployment == deployment):
            candidates = [
                e
                for e in entries.values()
                if "submitted" in e
                and e["submitted"].get("round") == job.round
                and isinstance(e["submitted"].get("at"), int | float)
                and e["submitted"]["at"] >= job.start - 1
                and (job.end is None or e["submitted"]["at"] <= job.end)
            ]
            if not candidates:
                continue
            job.slurm = candidates[-1]
            ended = job.slurm.get("ended", {})
            queued = ended.get("queued_s")
            if isinstance(queued, int | float) and queued >= 0:
                job.queued = float(queued)
            elif "started" in job.slurm and isinstance(job.slurm["started"].get("at"), int | float):
                job.queued = max(0.0, job.slurm["started"]["at"] - job.slurm["submitted"]["at"])
            elif job.end is None:
                job.queued = -1.0  # still waiting in the queue (no start seen yet)


def read_timeline(folder: RunFolder, log: Path) -> Timeline:
    reader = _Reader(folder)
    if log.is_file():
        with open(log, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                reader.feed(line)
        reader._finish_command()
    _attach_copies(reader.jobs, reader.copies)
    _attach_journal(folder, reader.jobs)
    return Timeline(reader.jobs, reader.copies, reader.started, reader.last)
