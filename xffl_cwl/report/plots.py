"""The report's pictures, drawn with matplotlib (Agg: no screen) from a RunView, one PNG per question."""

from __future__ import annotations

import time
from pathlib import Path

from xffl_cwl.report.run_view import RunView
from xffl_cwl.report.timeline import Job

PHASE_COLOURS = {
    "staging in": "#4e79a7",
    "queue wait": "#bab0ac",
    "training": "#59a14f",
    "staging out": "#f28e2b",
    "aggregation": "#e15759",
    "evaluation": "#b07aa1",
}
DPI = 110


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    import io

    from xffl_cwl.atomic import write_bytes_atomic

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    _pyplot().close(fig)
    write_bytes_atomic(path, buffer.getvalue())
    return path


def _per_round(ax, ylabel: str, title: str, xlabel: str = "round", legend_outside: bool = False) -> None:
    """Labels, grid and integer round ticks; a legend when something was drawn with a label."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.xaxis.get_major_locator().set_params(integer=True)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, **({"loc": "center left", "bbox_to_anchor": (1.01, 0.5)} if legend_outside else {}))


def global_loss(view: RunView, path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    points = [(view.first_round - 1, view.baseline_loss)] if view.baseline_loss is not None else []
    points += [(r.round, r.eval_loss) for r in view.rounds if r.eval_loss is not None]
    if points:
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-", color="#4e79a7", label="global model")
        for x, y in points:
            ax.annotate(f"{y:.3f}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no global model evaluated yet", ha="center", va="center", transform=ax.transAxes)
    _per_round(ax, "held-out loss", "Global held-out loss per round", "round (0: the initial model)")
    return _save(fig, path)


def facility_loss(view: RunView, path: Path) -> Path:
    """Each facility's own held-out loss before and after its local steps, and its last train loss."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.2, 4.0))
    colours = plt.get_cmap("tab10")
    for i, name in enumerate(view.facilities):
        rows = [r.facilities.get(name) for r in view.rounds]
        xs = [r.round for r, f in zip(view.rounds, rows, strict=True) if f is not None]
        rows = [f for f in rows if f is not None]
        colour = colours(i % 10)
        before = [(x, f.held_before) for x, f in zip(xs, rows, strict=True) if f.held_before is not None]
        after = [(x, f.held_after) for x, f in zip(xs, rows, strict=True) if f.held_after is not None]
        train = [(x, f.train_last) for x, f in zip(xs, rows, strict=True) if f.train_last is not None]
        if before:
            ax.plot(
                *zip(*before, strict=True), "o--", color=colour, mfc="none", alpha=0.8, label=f"{name}: held-out before"
            )
        if after:
            ax.plot(*zip(*after, strict=True), "o-", color=colour, label=f"{name}: held-out after")
        if train:
            ax.plot(*zip(*train, strict=True), "x:", color=colour, alpha=0.7, label=f"{name}: train (last step)")
    _per_round(ax, "loss", "Each facility before and after its local steps", legend_outside=True)
    return _save(fig, path)


def phases(job: Job, now: float | None = None) -> list[tuple[str, float, float]]:
    """(phase, start, end) of one job, in time order; a job still running ends `now` (if given)."""
    spans: list[tuple[str, float, float]] = []
    end = job.end if job.end is not None else now
    if job.tool == "train":
        if job.stage_in is not None and job.stage_in[1] > job.stage_in[0]:
            spans.append(("staging in", *job.stage_in))
        if end is not None:
            if job.queued < 0:  # still in the queue
                spans.append(("queue wait", job.start, end))
                return spans
            queued = max(0.0, min(job.queued, end - job.start))
            if queued > 0:
                spans.append(("queue wait", job.start, job.start + queued))
            spans.append(("training", job.start + queued, end))
        if job.stage_out is not None and job.stage_out[1] > job.stage_out[0]:
            spans.append(("staging out", *job.stage_out))
    elif end is not None:
        spans.append(("aggregation" if job.tool == "aggregate" else "evaluation", job.start, end))
    return spans


def timeline(view: RunView, path: Path) -> Path:
    """One row per facility and one for the aggregator; bars coloured by phase, over the run's time."""
    from matplotlib.patches import Patch

    plt = _pyplot()
    rows = [*view.facilities, "aggregator"]
    fig, ax = plt.subplots(figsize=(9.0, 0.55 * len(rows) + 1.6))
    origin = view.timeline.started or min((j.start for j in view.timeline.jobs), default=0.0)
    now = time.time() if view.status == "running" else None
    for job in view.timeline.jobs:
        row = rows.index(job.facility) if job.tool == "train" and job.facility in rows else len(rows) - 1
        for phase, start, end in phases(job, now):
            ax.broken_barh([(start - origin, max(end - start, 0.05))], (row - 0.35, 0.7), color=PHASE_COLOURS[phase])
        if job.outcome in ("failed", "left_out", "stopped") and job.end is not None:
            ax.text(job.end - origin, row, " ✗", va="center", color="#c00", fontsize=9)
    for r in view.rounds:
        if r.aggregate_job is not None and r.aggregate_job.end is not None:
            ax.axvline(r.aggregate_job.end - origin, color="#999", lw=0.6, ls=":")
            ax.text(r.aggregate_job.end - origin, len(rows) - 0.45, f" r{r.round}", fontsize=7, color="#666")
    ax.set_yticks(range(len(rows)), rows)
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the run started")
    ax.set_title("Round timeline per facility")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(
        handles=[Patch(color=c, label=p) for p, c in PHASE_COLOURS.items()],
        fontsize=7,
        ncol=6,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.22),
    )
    return _save(fig, path)


def bytes_moved(view: RunView, path: Path) -> Path:
    """Bytes to (model or change) and from (update) each facility, per round."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.2, 3.8))
    names = view.facilities
    width = 0.8 / max(len(names), 1)
    colours = plt.get_cmap("tab10")
    for i, name in enumerate(names):
        xs = [r.round + (i - (len(names) - 1) / 2) * width for r in view.rounds]
        down = [(r.facilities[name].bytes_down or 0) / 2**20 if name in r.facilities else 0 for r in view.rounds]
        up = [(r.facilities[name].bytes_up or 0) / 2**20 if name in r.facilities else 0 for r in view.rounds]
        ax.bar(xs, down, width, color=colours(i % 10), alpha=0.45, label=f"{name}: to it")
        ax.bar(xs, up, width, bottom=down, color=colours(i % 10), label=f"{name}: from it")
    _per_round(ax, "MiB", "Bytes moved per round and facility", legend_outside=True)
    return _save(fig, path)


def update_norms(view: RunView, path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    colours = plt.get_cmap("tab10")
    for i, name in enumerate(view.facilities):
        points = [
            (r.round, r.facilities[name].delta_norm)
            for r in view.rounds
            if name in r.facilities and r.facilities[name].delta_norm is not None
        ]
        if points:
            ax.plot(*zip(*points, strict=True), "o-", color=colours(i % 10), label=name)
    merged = [(r.round, r.update_norm) for r in view.rounds if r.update_norm is not None]
    if merged:
        ax.plot(*zip(*merged, strict=True), "s-", color="black", label="global update")
    _per_round(ax, "L2 norm of the change", "Update norms")
    return _save(fig, path)


PLOTS = {
    "global_loss.png": global_loss,
    "facility_loss.png": facility_loss,
    "timeline.png": timeline,
    "bytes.png": bytes_moved,
    "update_norms.png": update_norms,
}
