"""StreamFlow's log (0.2.0rc3, default level) as events a person cares about.

The lines used: `EXECUTING step S (job J) locally|on location L into directory D:`, each tool's
own stdout on success (our tools print one JSON line with an `event` field, see
xffl_cwl.contract.records.Event), `FAILED Job J`, `FAILED Step S`, `ERROR ...` and `COMPLETED
workflow execution`. Job names end in `/<outer>.<iteration>` inside the loop.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from xffl_cwl.contract.records import Event

LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+ (?P<level>[A-Z]+)\s+(?P<message>.*)$")
EXECUTING = re.compile(
    r"^EXECUTING step (?P<step>\S+) \(job (?P<job>\S+)\) (?:locally|on location (?P<location>\S+)) into directory (?P<directory>.+?):?$"
)
FAILED_JOB = re.compile(r"^FAILED Job (?P<job>\S+)")
FAILED_STEP = re.compile(r"^FAILED Step (?P<step>\S+)")
ITERATION = re.compile(r"/\d+\.(?P<index>\d+)$")


@dataclass
class LogEvent:
    """kind: started | failed | finished | error, or a tool's summary (trained | aggregated | evaluated)."""

    kind: str
    step: str | None = None
    job: str | None = None
    iteration: int | None = None
    directory: str | None = None
    location: str | None = None
    summary: Event | None = None
    message: str = ""


def step_of_job(job: str) -> str:
    return job.rsplit("/", 1)[0]


def iteration_of(job: str) -> int | None:
    match = ITERATION.search(job)
    return int(match["index"]) if match else None


class LogParser:
    """Feed it stderr lines one at a time; it returns the events each line completes."""

    def __init__(self) -> None:
        self.jobs: dict[str, LogEvent] = {}  # job name -> its EXECUTING event
        self.failed_jobs: set[str] = set()

    def feed(self, line: str) -> list[LogEvent]:
        match = LINE.match(line.rstrip("\n"))
        if not match:
            # A job's output is logged as one record: its later lines carry no timestamp.
            stripped = line.strip()
            return self._summary(stripped) if stripped.startswith("{") else []
        level, message = match["level"], match["message"].strip()
        if m := EXECUTING.match(message):
            event = LogEvent("started", m["step"], m["job"], iteration_of(m["job"]), m["directory"], m["location"])
            self.jobs[m["job"]] = event
            return [event]
        if m := FAILED_JOB.match(message):
            if m["job"] in self.failed_jobs:
                return []  # StreamFlow logs each failure twice
            self.failed_jobs.add(m["job"])
            started = self.jobs.get(m["job"])
            return [
                LogEvent(
                    "failed",
                    step_of_job(m["job"]),
                    m["job"],
                    iteration_of(m["job"]),
                    started.directory if started else None,
                    started.location if started else None,
                    message=message,
                )
            ]
        if m := FAILED_STEP.match(message):
            return [LogEvent("failed", m["step"], message=message)]
        if message.startswith("COMPLETED workflow execution"):
            return [LogEvent("finished")]
        if message.startswith("{") and level == "INFO":
            return self._summary(message)
        if level == "ERROR":
            return [LogEvent("error", message=message)]
        return []

    @staticmethod
    def _summary(message: str) -> list[LogEvent]:
        summary = Event.parse(message)
        return [] if summary is None else [LogEvent(summary.event, summary=summary)]
