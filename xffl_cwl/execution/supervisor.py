"""Run a run folder with `streamflow run`, show progress per round, and never hang.

StreamFlow 0.2.0rc3 hangs forever when a step fails inside a cwltool:Loop. The supervisor reads
its log as it is written; once a job has failed it gives StreamFlow a grace period to stop by
itself, then interrupts it (SIGINT lets it undeploy and cancel queued jobs), then terminates
and finally kills its whole process group. The failure is reported with the facility, the round
and the log to read.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xffl_cwl.errors import InputError
from xffl_cwl.execution.commands import default_sigint, executable, runner_env
from xffl_cwl.execution.streamflow_log import Event, LogParser
from xffl_cwl.run_folder import RunFolder, read_run_folder

LOG_NAME = "streamflow.log"
TOOL_LOGS = {"train": "train.log", "aggregate": "aggregate.log", "evaluate": "evaluate.log", "baseline": "evaluate.log"}


@dataclass
class RunResult:
    ok: bool
    outdir: Path
    log: Path
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)
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

    def round_of(self, event: Event) -> int | None:
        if isinstance(event.data.get("round"), int):
            return event.data["round"]
        return None if event.iteration is None else self.first_round + event.iteration

    def handle(self, event: Event) -> None:
        if event.kind == "started" and event.step and "/train_" in event.step:
            where = self.folder.deployment_of(event.step)
            self.say(f"{self.round_label(self.round_of(event))}: training started at {where}")
        elif event.kind == "trained":
            d = event.data
            loss, held = d.get("train_loss") or {}, d.get("eval_loss") or {}
            held_text = f", held-out {held['before']:.3f} -> {held['after']:.3f}" if held.get("after") is not None else ""
            self.say(f"{self.round_label(d.get('round'))}: {d['facility']} finished {d.get('steps')} steps, train loss {loss.get('first', float('nan')):.3f} -> {loss.get('last', float('nan')):.3f}{held_text}")
        elif event.kind == "aggregated":
            d = event.data
            rejected = d.get("rejected") or []
            extra = f", rejected {', '.join(r['facility'] + ' (' + r['reason'] + ')' for r in rejected)}" if rejected else ""
            self.say(f"{self.round_label(d.get('round'))}: aggregated with {d.get('strategy')}, {d.get('samples')} samples, update norm {d.get('update_norm', 0):.3f}{extra}")
        elif event.kind == "evaluated":
            d = event.data
            label = "baseline" if d.get("round") == self.first_round - 1 else self.round_label(d.get("round"))
            loss = d.get("eval_loss")
            self.say(f"{label}: global held-out loss {loss:.4f}" if loss is not None else f"{label}: recorded")
        elif event.kind == "failed" and self.failure is None and event.job:
            self.failure = self.describe_failure(event)
            self.say(f"FAILED: {self.failure}")

    def describe_failure(self, event: Event) -> str:
        step = event.step or "?"
        name = step.rsplit("/", 1)[-1]
        tool = "train" if name.startswith("train_") else name
        where = self.folder.deployment_of(step) or "?"
        round_number = self.round_of(event)
        who = f"facility {where}" if tool == "train" else f"step {name} (on {where})"
        when = "" if round_number is None or tool == "baseline" else f" in {self.round_label(round_number)}"
        log_hint, last_line = self._tool_log(event, tool, where)
        reason = f": {last_line}" if last_line else ""
        return f"{who} failed{when}{reason}; read {log_hint}"

    def _tool_log(self, event: Event, tool: str, deployment: str) -> tuple[str, str | None]:
        log_name = TOOL_LOGS.get(tool)
        if event.directory is None or log_name is None:
            return str(self.folder.root / LOG_NAME), None
        path = Path(event.directory) / log_name
        if (self.folder.deployments.get(deployment) or {}).get("type") == "xffl-facility":
            return f"{deployment}:{path}", self._remote_last_line(deployment, str(path))
        try:
            lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
        except OSError:
            return str(path), None
        return str(path), (lines[-1][:300] if lines else None)


    def _remote_last_line(self, deployment: str, path: str) -> str | None:
        """The facility's copy of the log is the only one: read its last line over SSH."""
        import asyncio

        from xffl_cwl.preflight import remote_tail

        config = (self.folder.deployments.get(deployment) or {}).get("config") or {}
        try:
            text = asyncio.run(asyncio.wait_for(remote_tail(config, self.folder.root, path, 1), 20))
        except Exception:  # the failure report must not fail: without the line, the path is still named
            return None
        return text.strip()[:300] if text else None


def preflight(folder: RunFolder) -> None:
    """Every facility reachable and ready, or one line per problem and exit code 2, before StreamFlow starts."""
    from xffl_cwl.preflight import run_checks
    from xffl_cwl.run_folder import preflight_targets

    targets = preflight_targets(folder)
    if not any(t.kind == "slurm" for t in targets):
        return
    failed = [c for c in run_checks(targets) if c.ok is False]
    if failed:
        raise InputError("; ".join(f"facility {c.facility}: {c.what}: {c.detail}" + (f" (fix: {c.fix})" if c.fix else "") for c in failed))


def _read_inputs(folder: RunFolder) -> tuple[int, int]:
    from ruamel.yaml import YAML

    order = YAML(typ="safe", pure=True).load(folder.settings.read_text(encoding="utf-8")) or {}
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
    outdir = Path(outdir).resolve() if outdir else root / "out"
    if outdir.exists() and any(outdir.iterdir()):
        raise InputError(f"output folder {outdir} already holds an earlier run's results; remove it or pass --outdir")
    log_path = root / LOG_NAME
    command = [executable("streamflow"), "run", "streamflow.yml", "--outdir", str(outdir)] + (["--debug"] if debug else [])
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
        pumps = [threading.Thread(target=_pump, args=(s, lines, t), daemon=True) for s, t in ((proc.stdout, "out"), (proc.stderr, "err"))]
        for pump in pumps:
            pump.start()
        open_streams, stop_at, stopped = 2, None, False
        last_error = ""
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
        proc.wait()
    seconds = time.monotonic() - started
    history_file = outdir / "history.jsonl"
    if progress.failure is None and proc.returncode == 0 and history_file.is_file():
        history = [json.loads(line) for line in history_file.read_text().splitlines() if line.strip()]
        return RunResult(True, outdir, log_path, seconds, history)
    failure = progress.failure or f"StreamFlow exited with code {proc.returncode}{': ' + last_error[:300] if last_error else ''}; read {log_path}"
    return RunResult(False, outdir, log_path, seconds, failure=failure)


def history_table(history: list[dict[str, Any]]) -> str:
    """Rounds down, facilities across (their last train loss), then the global held-out loss."""
    facilities = sorted({name for record in history for name in (record.get("facilities") or {})})
    header = ["round", *facilities, "global held-out loss"]
    rows = []
    for record in history:
        cells = [str(record.get("round"))]
        for name in facilities:
            loss = ((record.get("facilities") or {}).get(name) or {}).get("train_loss")
            cells.append("-" if loss is None else f"{loss:.4f}")
        loss = record.get("eval_loss")
        cells.append("-" if loss is None else f"{loss:.4f}")
        rows.append(cells)
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])
