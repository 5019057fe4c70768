"""Run a run folder with `streamflow run`, show progress per round, and never hang.

StreamFlow 0.2.0rc3 hangs forever when a step fails inside a cwltool:Loop. The supervisor reads
its log as it is written; once a job has failed it gives StreamFlow a grace period to stop by
itself, then interrupts it (SIGINT lets it undeploy and cancel queued jobs), then terminates
and finally kills its whole process group. The failure is reported with the facility, the round
and the log to read.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from xffl_cwl.contract.layout import (
    BASELINE_STEP,
    FACILITY_CONNECTOR,
    HISTORY_JSONL,
    OUT_DIR,
    STREAMFLOW_LOG,
    STREAMFLOW_YML,
    TOOL_LOGS,
    tool_of_step,
)
from xffl_cwl.contract.records import RecordError, RoundRecord
from xffl_cwl.errors import InputError
from xffl_cwl.execution.run_folder import RunFolder, read_job_order, read_run_folder
from xffl_cwl.execution.runners import default_sigint, executable, runner_env
from xffl_cwl.execution.streamflow_log import LogEvent, LogParser


@dataclass
class RunResult:
    ok: bool
    outdir: Path
    log: Path
    seconds: float
    history: list[RoundRecord] = field(default_factory=list)
    failure: str | None = None


@dataclass
class _Progress:
    """What has happened so far, to turn events into sentences."""

    folder: RunFolder
    first_round: int
    last_round: int
    say: Callable[[str], None]
    failure: str | None = None

    def round_label(self, round_number: int | None) -> str:
        return f"round {round_number}/{self.last_round}" if round_number is not None else "round ?"

    def round_of(self, event: LogEvent) -> int | None:
        if event.summary is not None and event.summary.round is not None:
            return event.summary.round
        return None if event.iteration is None else self.first_round + event.iteration

    def handle(self, event: LogEvent) -> None:
        e = event.summary
        if event.kind == "started" and event.step and tool_of_step(event.step) == "train":
            where = self.folder.deployment_of(event.step)
            self.say(f"{self.round_label(self.round_of(event))}: training started at {where}")
        elif event.kind == "trained" and e is not None:
            loss = e.train_loss
            held = e.held_out
            held_text = (
                f", held-out {_num(held.before)} -> {_num(held.after)}" if held and held.after is not None else ""
            )
            losses = f"train loss {_num(loss.first)} -> {_num(loss.last)}" if loss else "train loss ?"
            self.say(
                f"{self.round_label(e.round)}: {e.facility or '?'} finished {_num(e.steps, 'd')} steps, {losses}{held_text}"
            )
        elif event.kind == "aggregated" and e is not None:
            extra = f", rejected {', '.join(f'{r.facility} ({r.reason})' for r in e.rejected)}" if e.rejected else ""
            self.say(
                f"{self.round_label(e.round)}: aggregated with {e.strategy or '?'}, {_num(e.samples, 'd')} samples, "
                f"update norm {_num(e.update_norm)}{extra}"
            )
        elif event.kind == "evaluated" and e is not None:
            label = "baseline" if e.round == self.first_round - 1 else self.round_label(e.round)
            self.say(
                f"{label}: global held-out loss {e.eval_loss:.4f}" if e.eval_loss is not None else f"{label}: recorded"
            )
        elif event.kind == "failed" and self.failure is None and event.job:
            self.failure = self.describe_failure(event)
            self.say(f"FAILED: {self.failure}")

    def describe_failure(self, event: LogEvent) -> str:
        step = event.step or "?"
        name = step.rsplit("/", 1)[-1]
        tool = tool_of_step(step)
        where = self.folder.deployment_of(step) or "?"
        round_number = self.round_of(event)
        who = f"facility {where}" if tool == "train" else f"step {name} (on {where})"
        when = "" if round_number is None or name == BASELINE_STEP else f" in {self.round_label(round_number)}"
        log_hint, last_line = self._tool_log(event, tool, where)
        reason = f": {last_line}" if last_line else ""
        return f"{who} failed{when}{reason}; read {log_hint}"

    def _tool_log(self, event: LogEvent, tool: str, deployment: str) -> tuple[str, str | None]:
        log_name = TOOL_LOGS.get(tool)
        if event.directory is None or log_name is None:
            return str(self.folder.root / STREAMFLOW_LOG), None
        path = Path(event.directory) / log_name
        if (self.folder.deployments.get(deployment) or {}).get("type") == FACILITY_CONNECTOR:
            return f"{deployment}:{path}", self._remote_last_line(deployment, str(path))
        try:
            lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
        except OSError:
            return str(path), None
        return str(path), (lines[-1][:300] if lines else None)

    def _remote_last_line(self, deployment: str, path: str) -> str | None:
        """The facility's copy of the log is the only one: read its last line over SSH."""
        import asyncio

        from xffl_cwl.contract.facility import FacilityConfig
        from xffl_cwl.facility.preflight import remote_tail

        try:
            config = FacilityConfig.from_streamflow((self.folder.deployments.get(deployment) or {}).get("config") or {})
            text = asyncio.run(asyncio.wait_for(remote_tail(config, self.folder.root, path, 1), 20))
        except Exception:  # the failure report must not fail: without the line, the path is still named
            return None
        return text.strip()[:300] if text else None


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


def _read_inputs(folder: RunFolder) -> tuple[int, int]:
    order = read_job_order(folder)
    rounds = order.get("rounds")
    if not isinstance(rounds, int) or rounds < 1:
        raise InputError(f"{folder.settings}: rounds must be an integer of at least 1, got {rounds!r}")
    first = order.get("first_round", 1)
    return first, rounds


def _pump(stream, sink: queue.Queue, tag: str) -> None:
    for line in iter(stream.readline, ""):
        sink.put((tag, line))
    sink.put((tag, None))


def _stop(proc: subprocess.Popen, say: Callable[[str], None]) -> None:
    """SIGINT, then SIGTERM, then SIGKILL to StreamFlow's process group, each with a bounded wait."""
    for sig, wait in ((signal.SIGINT, 15.0), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            say(f"StreamFlow did not stop on {signal.Signals(sig).name}")


def run(
    root: Path,
    outdir: Path | None = None,
    debug: bool = False,
    timeout: float | None = None,
    grace: float = 10.0,
    say: Callable[[str], None] = print,
    raw: Callable[[str], None] | None = None,
    check: bool = True,
) -> RunResult:
    """Run the folder's streamflow.yml to completion or to a reported failure, within bounded time."""
    root = Path(root).resolve()
    folder = read_run_folder(root)
    first_round, last_round = _read_inputs(folder)
    if check:
        preflight(folder)
    outdir = Path(outdir).resolve() if outdir else root / OUT_DIR
    if outdir.exists() and any(outdir.iterdir()):
        raise InputError(f"output folder {outdir} already holds an earlier run's results; remove it or pass --outdir")
    log_path = root / STREAMFLOW_LOG
    command = [executable("streamflow"), "run", STREAMFLOW_YML, "--outdir", str(outdir)] + (
        ["--debug"] if debug else []
    )
    progress = _Progress(folder, first_round, last_round, say)
    parser = LogParser()
    started = time.monotonic()
    lines: queue.Queue = queue.Queue()
    stdout_text: list[str] = []
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(
            command,
            cwd=root,
            env=runner_env(root),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
            preexec_fn=default_sigint,
        )
        pumps = [
            threading.Thread(target=_pump, args=(s, lines, t), daemon=True)
            for s, t in ((proc.stdout, "out"), (proc.stderr, "err"))
        ]
        for pump in pumps:
            pump.start()
        open_streams, stop_at, stopped = 2, None, False
        last_error = ""
        try:
            while open_streams or proc.poll() is None:
                try:
                    tag, line = lines.get(timeout=0.5)
                except queue.Empty:
                    tag, line = None, None
                if tag is not None and line is None:
                    open_streams -= 1
                elif tag == "out":
                    stdout_text.append(line)
                elif tag == "err":
                    log.write(line)
                    log.flush()
                    if raw is not None:
                        raw(line.rstrip("\n"))
                    for event in parser.feed(line):
                        if event.kind == "error" and not last_error:
                            last_error = event.message
                        progress.handle(event)
                        if event.kind == "failed" and stop_at is None:
                            stop_at = time.monotonic() + grace
                now = time.monotonic()
                overdue = timeout is not None and now - started > timeout
                if not stopped and proc.poll() is None and ((stop_at is not None and now > stop_at) or overdue):
                    if overdue and progress.failure is None:
                        progress.failure = f"the run exceeded --timeout {timeout:.0f} s; read {log_path}"
                        say(f"FAILED: {progress.failure}")
                    _stop(proc, say)
                    stopped = True
                    open_streams = 0  # grandchildren may hold the pipes; we no longer wait for them
        except BaseException:
            # Our own failure (a bug, Ctrl-C, SIGTERM) must not leave StreamFlow and its jobs running.
            if proc.poll() is None:
                _stop(proc, lambda _text: None)
            raise
        proc.wait()
    seconds = time.monotonic() - started
    history_file = outdir / HISTORY_JSONL
    if progress.failure is None and proc.returncode == 0 and history_file.is_file():
        return RunResult(True, outdir, log_path, seconds, read_history(history_file))
    failure = (
        progress.failure
        or f"StreamFlow exited with code {proc.returncode}{': ' + last_error[:300] if last_error else ''}; read {log_path}"
    )
    return RunResult(False, outdir, log_path, seconds, failure=failure)


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


def _num(value: float | int | None, spec: str = ".3f") -> str:
    """A number for a progress line; `?` for a value a record did not have (or had malformed)."""
    return "?" if value is None else format(value, spec)


def history_table(history: list[RoundRecord]) -> str:
    """Rounds down, facilities across (their last train loss), then the global held-out loss."""
    facilities = sorted({name for record in history for name in record.facilities})
    header = ["round", *facilities, "global held-out loss"]
    rows = []
    for record in history:
        cells = [str(record.round)]
        for name in facilities:
            info = record.facilities.get(name)
            cells.append("-" if info is None or info.train_loss is None else f"{info.train_loss:.4f}")
        cells.append("-" if record.eval_loss is None else f"{record.eval_loss:.4f}")
        rows.append(cells)
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])
