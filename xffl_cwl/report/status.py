"""`xffl-cwl status RUN`: where a run stands, in a few lines, from another terminal.

It reads the same files as the report (run_view.py) and touches nothing: no SSH, no SLURM query,
no lock; a queued SLURM job is known from the plugin's journal (submitted, not yet seen running).
"""

from __future__ import annotations

import time

from xffl_cwl.report.run_view import RunView
from xffl_cwl.report.run_view import clean_text as clean
from xffl_cwl.report.timeline import Job


def _elapsed(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _job_line(job: Job | None, now: float) -> str:
    if job is None:
        return "not started"
    where = f"round {job.round}" if job.round is not None else "round ?"
    slurm = job.slurm.get("submitted", {}).get("job_id") if job.slurm else None
    tag = f" (SLURM job {slurm})" if slurm else ""
    if job.end is None:
        if job.queued < 0:
            return f"{where}: queued for {_elapsed(now - job.start)}{tag}"
        verb = {"train": "training", "aggregate": "aggregating", "evaluate": "evaluating"}[job.tool]
        return f"{where}: {verb} for {_elapsed(now - job.start)}{tag}"
    took = _elapsed(job.end - job.start)
    if job.outcome == "done":
        if job.tool == "train":
            loss = job.event.train_loss.last if job.event and job.event.train_loss else None
            extra = f", train loss {loss:.4f}" if loss is not None else ""
            return f"{where}: done in {took}{extra}"
        if job.tool == "evaluate":
            loss = job.event.eval_loss if job.event else None
            return f"{where}: evaluated in {took}" + (f", held-out loss {loss:.4f}" if loss is not None else "")
        return f"{where}: aggregated in {took}"
    if job.outcome == "left_out":
        reason = clean(job.event.reason) if job.event and job.event.reason else "?"
        return f"{where}: left out after {took}: {reason}"
    return f"{where}: {job.outcome} after {took}"


def status_text(view: RunView, now: float | None = None) -> str:
    now = time.time() if now is None else now
    head = f"{view.name}: {view.status}"
    if view.attempt > 1:
        head += f" (attempt {view.attempt})"
    done = max((r.round for r in view.rounds if r.complete), default=view.first_round - 1)
    if view.current_round is not None:
        head += f", round {view.current_round} of {view.last_round} in progress"
    else:
        head += f", {done} of {view.last_round} rounds done"
    if view.timeline.started is not None:
        end = now if view.status == "running" else (view.timeline.last_line or now)
        head += f", {_elapsed(end - view.timeline.started)} since the start"
    lines = [head]
    width = max([len(n) for n in view.facilities] + [len("aggregator")])
    for name in view.facilities:
        jobs = [j for j in view.timeline.jobs if j.tool == "train" and j.facility == name]
        lines.append(f"  {name.ljust(width)}  {_job_line(jobs[-1] if jobs else None, now)}")
    aggregator = [j for j in view.timeline.jobs if j.tool != "train"]
    lines.append(f"  {'aggregator'.ljust(width)}  {_job_line(aggregator[-1] if aggregator else None, now)}")
    losses = [(r.round, r.eval_loss) for r in view.rounds if r.eval_loss is not None]
    if losses:
        first = f"{view.baseline_loss:.4f} (initial) -> " if view.baseline_loss is not None else ""
        lines.append(f"global held-out loss: {first}{losses[-1][1]:.4f} (round {losses[-1][0]})")
    elif view.baseline_loss is not None:
        lines.append(f"global held-out loss: {view.baseline_loss:.4f} (initial model)")
    left = [
        f"{f.facility} in round {r.round}: {f.reason or f.status}"
        for r in view.rounds
        for f in r.facilities.values()
        if f.status in ("left out", "rejected")
    ]
    if left:
        lines.append("left out: " + "; ".join(left))
    if view.message and view.status != "running":
        lines.append(f"last error: {clean(view.message, 1000)}")
    return "\n".join(lines)
