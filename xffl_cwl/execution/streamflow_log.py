"""StreamFlow's log (0.2.0rc3, default level) as events a person cares about.

The lines used: `EXECUTING step S (job J) locally|on location L into directory D:`, each tool's
own stdout on success (our tools print one JSON line with an `event` field, see
xffl_cwl.contract.records.Event), the failure manager's lines (`FAILED Job J with error:` and the
exception after it, `Handling ... failure for job J`, `COMPLETED Recovery execution of failed job
J`, `FAILED Job J N times. Execution aborted`), the plugin's `facility F is left out of round R:
REASON` warnings, any other `ERROR ...` line, and `COMPLETED workflow execution`. Job names end in
`/<outer>.<iteration>` inside the loop.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from xffl_cwl.contract.records import Event

LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+ (?P<level>[A-Z]+)\s+(?P<message>.*)$")
EXECUTING = re.compile(
    r"^EXECUTING step (?P<step>\S+) \(job (?P<job>\S+)\) (?:locally|on location (?P<location>\S+)) into directory (?P<directory>.+?):?$"
)
FAILED_JOB = re.compile(r"^FAILED Job (?P<job>\S+) with error")
ABORTED = re.compile(r"^FAILED Job (?P<job>\S+) \d+ times\. Execution aborted")
RECOVERING = re.compile(r"^Handling \S+ failure for job (?P<job>\S+)")
RECOVERED = re.compile(r"^COMPLETED Recovery execution of failed job (?P<job>\S+)")
LEFT_OUT = re.compile(r"^facility (?P<facility>\S+) is left out of round (?P<round>\d+): (?P<reason>.*)$")
ITERATION = re.compile(r"/\d+\.(?P<index>\d+)$")
DETAIL_LINES = 8  # lines of a failure's traceback kept to find its reason


@dataclass
class LogEvent:
    """kind: started | failing | recovering | recovered | failed | finished | error | left_out_warning,
    or a tool's summary (trained | left_out | aggregated | evaluated)."""

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


def reason_of(lines: list[str]) -> str:
    """The telling line of a StreamFlow traceback: the last exception message that is not a wrapper."""
    messages = [line.strip() for line in lines if re.match(r"^\s*[\w.]+(Exception|Error)\b.*: ", line)]
    if not messages:
        return ""
    text = messages[-1].split(": ", 1)[-1]
    return re.sub(r"^FAILED Job \S+ with error:?\s*", "", text)[:300]


class LogParser:
    """Feed it stderr lines one at a time; it returns the events each line completes."""

    def __init__(self) -> None:
        self.jobs: dict[str, LogEvent] = {}  # job name -> its EXECUTING event
        self._detail: tuple[LogEvent, list[str]] | None = None  # a failing job and the lines after it

    def feed(self, line: str) -> list[LogEvent]:
        match = LINE.match(line.rstrip("\n"))
        if not match:
            stripped = line.strip()
            if self._detail is not None and len(self._detail[1]) < DETAIL_LINES:
                self._detail[1].append(stripped)
                self._detail[0].message = reason_of(self._detail[1]) or self._detail[0].message
            # A job's output is logged as one record: its later lines carry no timestamp.
            return self._summary(stripped) if stripped.startswith("{") else []
        self._detail = None
        level, message = match["level"], match["message"].strip()
        if m := EXECUTING.match(message):
            event = LogEvent("started", m["step"], m["job"], iteration_of(m["job"]), m["directory"], m["location"])
            self.jobs[m["job"]] = event
            return [event]
        if m := FAILED_JOB.match(message):
            event = self._job_event("failing", m["job"], "")
            self._detail = (event, [])
            return [event]
        if m := ABORTED.match(message):
            return [self._job_event("failed", m["job"], message)]
        if m := RECOVERING.match(message):
            return [self._job_event("recovering", m["job"], message)]
        if m := RECOVERED.match(message):
            return [self._job_event("recovered", m["job"], message)]
        if m := LEFT_OUT.match(message):
            summary = Event("left_out", round=int(m["round"]), facility=m["facility"], reason=m["reason"][:300])
            return [LogEvent("left_out_warning", summary=summary, message=message)]
        if message.startswith("COMPLETED workflow execution"):
            return [LogEvent("finished")]
        if message.startswith("{") and level == "INFO":
            return self._summary(message)
        if level == "ERROR" and not message.startswith(("FAILED Step", "FAILED Workflow", "FAILED Recovery")):
            return [LogEvent("error", message=message)]
        return []

    def _job_event(self, kind: str, job: str, message: str) -> LogEvent:
        started = self.jobs.get(job)
        return LogEvent(
            kind,
            step_of_job(job),
            job,
            iteration_of(job),
            started.directory if started else None,
            started.location if started else None,
            message=message,
        )

    @staticmethod
    def _summary(message: str) -> list[LogEvent]:
        summary = Event.parse(message)
        return [] if summary is None else [LogEvent(summary.event, summary=summary)]
