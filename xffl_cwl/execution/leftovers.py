"""What an earlier attempt may have left running: its StreamFlow process group, and SLURM jobs the
plugin journaled as submitted but never saw end. Both are stopped before a run starts or resumes,
and after a run stops, so nothing keeps training (or holding an allocation) behind the user's back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import signal
import time
from collections.abc import Callable
from pathlib import Path

from xffl_cwl.contract.facility import FacilityConfig
from xffl_cwl.contract.layout import FACILITY_CONNECTOR, STATE_DIR_NAME
from xffl_cwl.execution.run_folder import RunFolder

CANCEL_TIMEOUT = 60.0


def kill_group(pgid: int | None, grace: float = 10.0) -> bool:
    """SIGTERM then SIGKILL to a process group; True if one was running."""
    if not pgid:
        return False
    try:
        os.killpg(pgid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return False
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    return True


def pending_jobs(root: Path) -> dict[str, list[str]]:
    """Journaled SLURM job ids, per deployment, that were submitted and never ended nor cancelled."""
    pending: dict[str, list[str]] = {}
    for journal in sorted((Path(root) / STATE_DIR_NAME / "jobs").glob("*.jsonl")):
        submitted: list[str] = []
        done: set[str] = set()
        for line in journal.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("event") == "submitted":
                submitted.append(str(entry.get("job_id")))
            elif entry.get("event") == "ended":
                done.add(str(entry.get("job_id")))
            elif entry.get("event") == "cancelled":
                done |= {str(j) for j in entry.get("job_ids", [])}
        ids = [j for j in submitted if j not in done and j.isdigit()]
        if ids:
            pending[journal.stem] = ids
    return pending


async def _cancel_on(folder: RunFolder, deployment: str, ids: list[str]) -> str:
    from xffl_cwl.facility.ssh import Login, connect

    entry = folder.deployments.get(deployment) or {}
    if entry.get("type") != FACILITY_CONNECTOR:
        return f"{deployment}: not a SLURM facility, nothing to cancel"
    login = Login.of(FacilityConfig.from_streamflow(entry.get("config") or {}), folder.root)
    connection = await connect(login, timeout=15)
    try:
        listed = await connection.run(f"squeue -h -o %i -j {shlex.quote(','.join(ids))}", check=False)
        active = [j for j in (listed.stdout or "").split() if j in ids]
        if active:
            await connection.run(f"scancel {' '.join(active)}", check=False)
    finally:
        connection.close()
    _journal_cancelled(folder.root, deployment, ids)
    return (
        f"{deployment}: cancelled SLURM job(s) {', '.join(active)}"
        if active
        else f"{deployment}: no job left in the queue"
    )


def _journal_cancelled(root: Path, deployment: str, ids: list[str]) -> None:
    path = Path(root) / STATE_DIR_NAME / "jobs" / f"{deployment}.jsonl"
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"event": "cancelled", "at": time.time(), "job_ids": ids, "by": "xffl-cwl run"}) + "\n")


def cancel_pending_jobs(folder: RunFolder, say: Callable[[str], None], timeout: float = CANCEL_TIMEOUT) -> None:
    """Cancel what the journals say may still be queued or running, on every facility at once (bounded)."""
    pending = pending_jobs(folder.root)
    if not pending:
        return

    async def cancel_all() -> list[str]:
        async def one(deployment: str, ids: list[str]) -> str:
            try:
                return await _cancel_on(folder, deployment, ids)
            except Exception as exc:  # an unreachable facility: say so, the others still get cancelled
                return f"{deployment}: could not cancel SLURM job(s) {', '.join(ids)} ({exc or type(exc).__name__}); cancel them by hand"

        return await asyncio.wait_for(asyncio.gather(*(one(d, ids) for d, ids in pending.items())), timeout)

    try:
        for line in asyncio.run(cancel_all()):
            say(line)
    except TimeoutError:
        say(f"cancelling leftover SLURM jobs took more than {timeout:.0f} s; check the queues by hand: {pending}")
