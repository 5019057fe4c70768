"""StreamFlow's log (0.2.0rc3, default level) as events a person cares about.

The lines used: `EXECUTING step S (job J) locally|on location L into directory D:`, each tool's
own stdout on success (our tools print one JSON summary line), `FAILED Job J`, `FAILED Step S`,
and `COMPLETED workflow execution`. Job names end in `/<outer>.<iteration>` inside the loop.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+ (?P<level>[A-Z]+)\s+(?P<message>.*)$")
EXECUTING = re.compile(r"^EXECUTING step (?P<step>\S+) \(job (?P<job>\S+)\) (?:locally|on location (?P<location>\S+)) into directory (?P<directory>.+?):?$")
FAILED_JOB = re.compile(r"^FAILED Job (?P<job>\S+)")
FAILED_STEP = re.compile(r"^FAILED Step (?P<step>\S+)")
ITERATION = re.compile(r"/\d+\.(?P<index>\d+)$")


@dataclass
class Event:
    """kind: started | trained | aggregated | evaluated | failed | finished | error"""

    kind: str
    step: str | None = None
    job: str | None = None
    iteration: int | None = None
    directory: str | None = None
    location: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    message: str = ""


def step_of_job(job: str) -> str:
    return job.rsplit("/", 1)[0]


def iteration_of(job: str) -> int | None:
    match = ITERATION.search(job)
    return int(match["index"]) if match else None


class LogParser:
    """Feed it stderr lines one at a time; it returns the events each line completes."""

    def __init__(self) -> None:
        self.jobs: dict[str, Event] = {}  # job name -> its EXECUTING event
        self.failed_jobs: set[str] = set()

    def feed(self, line: str) -> list[Event]:
        match = LINE.match(line.rstrip("\n"))
        if not match:
            # A job's output is logged as one record: its later lines carry no timestamp.
            stripped = line.strip()
            return self._summary(stripped) if stripped.startswith("{") else []
        level, message = match["level"], match["message"].strip()
        if m := EXECUTING.match(message):
            event = Event("started", m["step"], m["job"], iteration_of(m["job"]), m["directory"], m["location"])
            self.jobs[m["job"]] = event
            return [event]
        if m := FAILED_JOB.match(message):
            if m["job"] in self.failed_jobs:
                return []  # StreamFlow logs each failure twice
            self.failed_jobs.add(m["job"])
            started = self.jobs.get(m["job"])
            return [
                Event(
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
            return [Event("failed", m["step"], message=message)]
        if message.startswith("COMPLETED workflow execution"):
            return [Event("finished")]
        if message.startswith("{") and level == "INFO":
            return self._summary(message)
        if level == "ERROR":
            return [Event("error", message=message)]
        return []

    @staticmethod
    def _summary(message: str) -> list[Event]:
        try:
            data = json.loads(message)
        except json.JSONDecodeError:
            return []
        if not isinstance(data, dict):
            return []
        if "facility" in data and "train_loss" in data:
            return [Event("trained", data=data)]
        if "strategy" in data and "rejected" in data:
            return [Event("aggregated", data=data)]
        if "eval_loss" in data and "round" in data:
            return [Event("evaluated", data=data)]
        return []
