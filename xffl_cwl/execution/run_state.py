"""What `xffl-cwl run` keeps in a run folder (`.xffl/`), so a run can be resumed and never mixed up.

- `run.json`: the run's status (running, finished, failed, interrupted), its attempt, the process
  group of the StreamFlow it runs, the facilities left out of a round by the orchestrator;
- `rounds.jsonl`: one line per completed round: where its global model, server state and history are;
- `lock`: held (flock) by the one `xffl-cwl run` working on the folder;
- `jobs/<deployment>.jsonl`: the xffl-facility plugin's journal of SLURM jobs submitted and ended.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from xffl_cwl.atomic import write_text_atomic
from xffl_cwl.contract.layout import (
    OUT_DIR,
    REPORT_DIR,
    RESUME_INPUTS,
    RESUME_STREAMFLOW,
    STATE_DIR_NAME,
    STREAMFLOW_LOG,
    TMP_DIR,
    WORK_DIR,
)
from xffl_cwl.errors import InputError

RUN_JSON = "run.json"
ROUNDS_JSONL = "rounds.jsonl"
LOCK = "lock"


@dataclass
class RunState:
    status: str  # running | finished | failed | interrupted
    attempt: int = 0
    pgid: int | None = None  # StreamFlow's process group while an attempt runs
    left_out: list[str] = field(default_factory=list)  # NAME@ROUND: REASON, decided by the orchestrator
    message: str = ""

    def save(self, root: Path) -> None:
        write_text_atomic(state_dir(root) / RUN_JSON, json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, root: Path) -> RunState | None:
        path = state_dir(root) / RUN_JSON
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(
                status=str(data["status"]),
                attempt=int(data.get("attempt", 0)),
                pgid=data.get("pgid") if isinstance(data.get("pgid"), int) else None,
                left_out=[str(e) for e in data.get("left_out", [])],
                message=str(data.get("message", "")),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise InputError(f"{path} is damaged ({exc}); start over with --force") from exc


@dataclass(frozen=True)
class RoundDone:
    """A round whose global model was aggregated and recorded: where its outputs are (paths in the run folder)."""

    round: int
    model: str
    state: str | None
    history: str


def state_dir(root: Path) -> Path:
    path = Path(root) / STATE_DIR_NAME
    path.mkdir(exist_ok=True)
    return path


def record_round(root: Path, done: RoundDone) -> None:
    with open(state_dir(root) / ROUNDS_JSONL, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(asdict(done)) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def completed_rounds(root: Path) -> dict[int, RoundDone]:
    """The recorded rounds whose outputs still exist, latest record per round."""
    path = Path(root) / STATE_DIR_NAME / ROUNDS_JSONL
    rounds: dict[int, RoundDone] = {}
    if not path.is_file():
        return rounds
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            done = RoundDone(**json.loads(line))
        except (ValueError, TypeError):
            continue  # a line cut short by a crash
        model, history = Path(root) / done.model, Path(root) / done.history
        if model.is_dir() and history.is_file():
            rounds[done.round] = done
    return rounds


@contextlib.contextmanager
def run_lock(root: Path) -> Iterator[None]:
    """One `xffl-cwl run` per folder at a time; the kernel releases the lock if that process dies."""
    path = state_dir(root) / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise InputError(f"another xffl-cwl run (pid {holder}) is running {root}; wait for it or stop it") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)


def clear(root: Path) -> None:
    """Everything a previous run wrote in the folder (--force), keeping the generated files."""
    root = Path(root)
    for name in (WORK_DIR, OUT_DIR, TMP_DIR, REPORT_DIR, ".streamflow"):
        shutil.rmtree(root / name, ignore_errors=True)
    for name in (STREAMFLOW_LOG, RESUME_INPUTS, RESUME_STREAMFLOW):
        (root / name).unlink(missing_ok=True)
    for path in (root / STATE_DIR_NAME).glob("*"):
        if path.name != LOCK:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
