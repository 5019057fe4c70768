"""The process CWL runs for a train step: it runs the training in a child process and records how
the round ended, so that a facility whose training fails is left out of the round, not the run.

The child is `xffl-cwl train` itself (without --status). Whatever it does (exits with an error,
is killed by the kernel for memory, runs past the deadline), this process survives it, writes
status.json and exits 0; the step then has no update and the aggregator leaves the facility out.
Its stderr passes through to ours (the step's log), and its last line becomes the reason.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from xffl_cwl.atomic import write_text_atomic
from xffl_cwl.contract.layout import DEADLINE_ENV, STATUS_FILE_ENV
from xffl_cwl.contract.records import Event, TrainStatus, json_text

STOP_GRACE = 20.0  # seconds a child gets between SIGTERM and SIGKILL


def _pump(stream, sink, tail: deque) -> None:
    for line in iter(stream.readline, ""):
        sink.write(line)
        sink.flush()
        if line.strip():
            tail.append(line.strip())
    stream.close()


def _collect(stream, lines: list[str]) -> None:
    lines.extend(iter(stream.readline, ""))
    stream.close()


def _wait(child: subprocess.Popen, deadline: float | None, interrupted: list[int]) -> bool:
    """Wait for the child; past the deadline, or once interrupted, SIGTERM it, then SIGKILL it
    STOP_GRACE seconds later. True when the deadline ended it."""
    started = time.monotonic()
    expired = False
    kill_at: float | None = None
    while True:
        try:
            child.wait(timeout=0.5)
            return expired
        except subprocess.TimeoutExpired:
            pass
        now = time.monotonic()
        if deadline is not None and not expired and not interrupted and now - started > deadline:
            expired = True
            child.terminate()
        if (expired or interrupted) and kill_at is None:
            kill_at = now + STOP_GRACE
        if kill_at is not None and now > kill_at:
            child.kill()


def _reason(code: int, tail: deque) -> str:
    last = (tail[-1] if tail else "").removeprefix("xffl-cwl train: error: ")
    if code < 0:
        name = signal.Signals(-code).name
        hint = " (out of memory?)" if -code == signal.SIGKILL else ""
        return f"the training process was killed by {name}{hint}" + (f"; its last line: {last[:300]}" if last else "")
    return last[:500] or f"the training process exited with code {code}"


def run_guarded(
    child_args: list[str],
    status_path: Path,
    facility: str,
    round_number: int,
    deadline: float | None,
    out: Path,
    echo: Callable[[str], None],
) -> int:
    """Run `xffl-cwl train CHILD_ARGS` and record the outcome in `status_path`; 0 unless we were stopped."""
    started = time.monotonic()
    tail: deque = deque(maxlen=3)
    env = {k: v for k, v in os.environ.items() if k not in (STATUS_FILE_ENV, DEADLINE_ENV)}  # the child just trains
    child = subprocess.Popen(
        [sys.executable, "-m", "xffl_cwl.cli", "train", *child_args],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out_lines: list[str] = []
    pumps = [
        threading.Thread(target=_pump, args=(child.stderr, sys.stderr, tail), daemon=True),
        threading.Thread(target=_collect, args=(child.stdout, out_lines), daemon=True),
    ]
    for pump in pumps:
        pump.start()
    interrupted: list[int] = []

    def forward(signum: int, _frame) -> None:
        # Only signal here: the main thread may be inside child.wait(), holding the lock that any
        # wait from this handler would need; it escalates to SIGKILL itself.
        interrupted.append(signum)
        child.terminate()

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        expired = _wait(child, deadline, interrupted)
        for pump in pumps:
            pump.join(timeout=5)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    seconds = round(time.monotonic() - started, 3)
    if interrupted:
        status = TrainStatus(
            facility, round_number, "failed", f"stopped by {signal.Signals(interrupted[0]).name}", seconds
        )
        write_text_atomic(status_path, json_text(status.to_json()))
        return 128 + interrupted[0]
    if expired:
        status = TrainStatus(
            facility, round_number, "deadline", f"still training after the {deadline:g} s deadline", seconds
        )
    elif child.returncode == 0 and (out / "update.json").is_file():
        status = TrainStatus(facility, round_number, "ok", "", seconds)
    elif child.returncode == 0:
        status = TrainStatus(facility, round_number, "failed", "the training ended without writing its update", seconds)
    else:
        status = TrainStatus(facility, round_number, "failed", _reason(child.returncode, tail), seconds)
    write_text_atomic(status_path, json_text(status.to_json()))
    if status.status == "ok":
        for line in out_lines:
            echo(line.rstrip("\n"))
    else:
        echo(Event("left_out", round=round_number, facility=facility, reason=status.reason).line())
    return 0
