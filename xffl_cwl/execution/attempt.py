"""One `streamflow run` of a run folder, under a watchdog that never lets it hang or outlive us.

StreamFlow 0.2.0rc3 hangs forever when a step fails inside a cwltool:Loop, goes idle after some
errors it only logs, and keeps running if the process that started it dies. So: its log is read as
it is written (and copied to streamflow.log line by line); a job that fails beyond the failure
manager's retries, an ERROR line, no progress while nothing runs, the timeout or our own
interruption stop it: SIGINT first (it undeploys, which cancels SLURM jobs), then SIGTERM, then
SIGKILL to its whole process group. It gets SIGINT by itself if we die (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from xffl_cwl.contract.layout import (
    AGGREGATE_STEP,
    BASELINE_STEP,
    EVALUATE_STEP,
    HISTORY_JSONL,
    STATE_DIR,
    tool_of_step,
)
from xffl_cwl.execution.progress import Progress
from xffl_cwl.execution.run_folder import RunFolder
from xffl_cwl.execution.run_state import RoundDone
from xffl_cwl.execution.runners import executable, runner_env
from xffl_cwl.execution.streamflow_log import LogEvent, LogParser

RECOVERY_WAIT = 5.0  # seconds after "FAILED Job" for the failure manager to say it handles it
STOP_WAITS = (
    (signal.SIGINT, 6.0),
    (signal.SIGTERM, 5.0),
    (signal.SIGKILL, 5.0),
)  # after SIGINT, leftover SLURM jobs are cancelled from the journal


class StopRequest:
    """Set by SIGINT/SIGTERM handlers: the first asks for a clean stop, a second one forces it."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self.forced = False

    def __call__(self, signum: int, _frame) -> None:
        if self.signal is None:
            self.signal = signum
        else:
            self.forced = True


@dataclass
class AttemptResult:
    ok: bool
    failure: str | None = None
    lost: tuple[str, int, str] | None = None  # (facility, round, reason): a train job failed beyond recovery
    interrupted: int | None = None  # the signal that stopped us


def _child_setup() -> None:
    """In StreamFlow's process: default SIGINT (even if we ignore it), and SIGINT when we die."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGINT)  # PR_SET_PDEATHSIG


def _pump(stream, sink: queue.Queue, tag: str) -> None:
    for line in iter(stream.readline, ""):
        sink.put((tag, line))
    sink.put((tag, None))


def _kill_rest(pgid: int, wait: float = 5.0) -> None:
    """SIGKILL to what is left of StreamFlow's process group (the tools it started), until it is gone."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            return
        time.sleep(0.1)


def stop_streamflow(proc: subprocess.Popen, stop: StopRequest, say: Callable[[str], None]) -> None:
    """SIGINT, then SIGTERM, then SIGKILL to StreamFlow's process group, each with a bounded wait."""
    for sig, wait in STOP_WAITS:
        if stop.forced and sig != signal.SIGKILL:
            continue
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and not (stop.forced and sig != signal.SIGKILL):
            try:
                proc.wait(timeout=0.25)
                break
            except subprocess.TimeoutExpired:
                continue
        if proc.poll() is not None:
            _kill_rest(proc.pid)
            return
        if sig != signal.SIGKILL and not stop.forced:
            say(f"StreamFlow did not stop on {signal.Signals(sig).name}")


@dataclass
class Attempt:
    """Everything one attempt needs to know."""

    folder: RunFolder
    config: Path  # the streamflow.yml to run
    first_round: int
    last_round: int
    start_model: str  # the model and state the attempt starts from (for the baseline's round record)
    start_state: str | None
    outdir: Path
    log: Path
    say: Callable[[str], None]
    on_round: Callable[[RoundDone], None]
    on_start: Callable[[int], None]  # StreamFlow's process group id
    stop: StopRequest
    raw: Callable[[str], None] | None = None
    debug: bool = False
    timeout: float | None = None
    grace: float = 2.0
    stall: float = 120.0


class _Watch:
    """The state one attempt's log has told us."""

    def __init__(self, attempt: Attempt) -> None:
        self.a = attempt
        self.progress = Progress(attempt.folder, attempt.first_round, attempt.last_round, attempt.say)
        self.parser = LogParser()
        self.dirs: dict[tuple[str, int | None], str] = {}  # (step name, iteration) -> job directory
        self.failing: dict[str, tuple[float, LogEvent]] = {}
        self.running = 0
        self.failure: str | None = None
        self.lost: tuple[str, int, str] | None = None
        self.stop_at: float | None = None
        self.finished = False

    def feed(self, line: str) -> None:
        for event in self.parser.feed(line):
            self.progress.handle(event)
            self._track(event)

    def _track(self, event: LogEvent) -> None:
        if event.kind == "started" and event.step:
            self.running += 1
            self.dirs[(event.step.rsplit("/", 1)[-1], event.iteration)] = event.directory or ""
        elif event.kind in ("trained", "left_out", "aggregated", "evaluated"):
            self.running -= 1
            if event.kind == "evaluated" and event.summary is not None and event.summary.round is not None:
                self._round_done(event.summary.round)
        elif event.kind == "failing" and event.job:
            if tool_of_step(event.step or "") == "train":
                self.failing[event.job] = (time.monotonic(), event)
            else:  # aggregate and evaluate run on the aggregator: a failure there does not go away on a retry
                self._final(event)
        elif event.kind in ("recovering", "recovered") and event.job:
            self.failing.pop(event.job, None)
        elif event.kind == "failed" and event.job:
            self.failing.pop(event.job, None)
            self._final(event)
        elif event.kind == "error" and self.failure is None and self.lost is None:
            self.failure = f"StreamFlow: {event.message[:300]}; read {self.a.log}"
            self.stop_at = self.stop_at or time.monotonic() + self.a.grace
        elif event.kind == "finished":
            self.finished = True

    def settle(self) -> None:
        """A train job's failure that the failure manager did not take up within RECOVERY_WAIT is final."""
        for job, (since, event) in list(self.failing.items()):
            if time.monotonic() - since > RECOVERY_WAIT:
                del self.failing[job]
                self._final(event)

    def _final(self, event: LogEvent) -> None:
        if self.failure is not None or self.lost is not None:
            return
        self.running -= 1
        step = event.step or ""
        if tool_of_step(step) == "train":
            facility = self.a.folder.deployment_of(step) or step.rsplit("_", 1)[-1]
            round_number = self.progress.round_of(event) or self.a.first_round
            reason = event.message or "its job failed"
            self.lost = (facility, round_number, reason)
            self.a.say(f"{self.progress.round_label(round_number)}: {facility} failed beyond recovery: {reason}")
            self.stop_at = time.monotonic()  # StreamFlow would hang: stop it now
        else:
            self.failure = self.progress.describe_failure(event)
            self.a.say(f"FAILED: {self.failure}")
            self.stop_at = time.monotonic() + self.a.grace

    def _round_done(self, round_number: int) -> None:
        root = self.a.folder.root
        if round_number == self.a.first_round - 1:
            history = Path(self.dirs.get((BASELINE_STEP, None), "")) / HISTORY_JSONL
            done = RoundDone(round_number, self.a.start_model, self.a.start_state, _relative(history, root))
        else:
            i = round_number - self.a.first_round
            agg, ev = self.dirs.get((AGGREGATE_STEP, i)), self.dirs.get((EVALUATE_STEP, i))
            if not agg or not ev:
                return
            state = Path(agg) / STATE_DIR
            done = RoundDone(
                round_number,
                _relative(Path(agg) / "model", root),
                _relative(state, root) if state.is_dir() else None,
                _relative(Path(ev) / HISTORY_JSONL, root),
            )
        self.a.on_round(done)


def _relative(path: Path, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(root))
    except ValueError:
        return str(Path(path).resolve())


def run_attempt(a: Attempt) -> AttemptResult:
    """Run StreamFlow once; return when it finished, failed, lost a facility or was stopped."""
    command = [executable("streamflow"), "run", str(a.config.name), "--outdir", str(a.outdir)]
    command += ["--debug"] if a.debug else []
    watch = _Watch(a)
    started = last_line = time.monotonic()
    lines: queue.Queue = queue.Queue()
    with open(a.log, "a", encoding="utf-8") as log:
        proc = subprocess.Popen(
            command,
            cwd=a.folder.root,
            env=runner_env(a.folder.root),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
            preexec_fn=_child_setup,
        )
        a.on_start(proc.pid)
        for stream, tag in ((proc.stdout, "out"), (proc.stderr, "err")):
            threading.Thread(target=_pump, args=(stream, lines, tag), daemon=True).start()
        open_streams, stopped = 2, False
        try:
            while open_streams or proc.poll() is None:
                try:
                    tag, line = lines.get(timeout=0.25)
                except queue.Empty:
                    tag, line = None, None
                if tag is not None and line is None:
                    open_streams -= 1
                elif tag == "err":
                    last_line = time.monotonic()
                    log.write(line)
                    log.flush()
                    if a.raw is not None:
                        a.raw(line.rstrip("\n"))
                    watch.feed(line)
                watch.settle()
                now = time.monotonic()
                if stopped or proc.poll() is not None:
                    if stopped:
                        open_streams = 0  # grandchildren may hold the pipes; we no longer wait for them
                    continue
                if a.stop.signal is not None:
                    a.say(f"stopping (got {signal.Signals(a.stop.signal).name}); a second one forces it")
                elif a.timeout is not None and now - started > a.timeout and watch.failure is None:
                    watch.failure = f"the run exceeded --timeout {a.timeout:.0f} s; read {a.log}"
                    a.say(f"FAILED: {watch.failure}")
                elif watch.running <= 0 and now - last_line > a.stall and not watch.finished:
                    watch.failure = (
                        f"StreamFlow made no progress for {a.stall:.0f} s with nothing running; read {a.log}"
                    )
                    a.say(f"FAILED: {watch.failure}")
                elif watch.stop_at is None or now < watch.stop_at:
                    continue
                stop_streamflow(proc, a.stop, a.say)
                stopped = True
        except BaseException:
            # Our own failure (a bug, a second Ctrl-C) must not leave StreamFlow and its jobs running.
            if proc.poll() is None:
                a.stop.forced = True
                stop_streamflow(proc, a.stop, lambda _text: None)
            raise
        proc.wait()
    if a.stop.signal is not None:
        return AttemptResult(False, interrupted=a.stop.signal)
    if watch.lost is not None:
        return AttemptResult(False, lost=watch.lost)
    if watch.failure is None and proc.returncode == 0 and (a.outdir / HISTORY_JSONL).is_file():
        return AttemptResult(True)
    return AttemptResult(False, failure=watch.failure or f"StreamFlow exited with code {proc.returncode}; read {a.log}")
