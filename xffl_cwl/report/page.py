"""`xffl-cwl report RUN`: RUN/report/ with the PNG plots and one self-contained HTML page.

The page embeds its pictures (data: URIs) and has no script and no link out, so it opens from a
mail attachment or an air-gapped login node. Every text a facility could have written is escaped.
"""

from __future__ import annotations

import base64
import html
import json
import time
from pathlib import Path

from xffl_cwl.atomic import write_text_atomic
from xffl_cwl.contract.layout import REPORT_DIR
from xffl_cwl.report.plots import PLOTS, phases
from xffl_cwl.report.run_view import Digests, FacilityRound, RunView, read_run

PAGE = "index.html"
DIGEST_CACHE = ".digests.json"

STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
th,td{border:1px solid #ddd;padding:.25em .5em;text-align:right;vertical-align:top}
th{background:#f4f4f4}td.l,th.l{text-align:left}code{font-size:.9em;word-break:break-all}
img{max-width:100%;margin:.5em 0}.bad{color:#b00}.ok{color:#070}.muted{color:#888}
.cards{display:flex;gap:1em;flex-wrap:wrap}.card{border:1px solid #ddd;border-radius:6px;padding:.6em 1em}
.card b{display:block;font-size:1.3em}
"""


def e(value: object) -> str:
    return html.escape(str(value), quote=True)


def num(value: float | None, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def size(value: int | None) -> str:
    if value is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value} B"


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


def _table(header: list[str], rows: list[list[str]], left: int = 1) -> str:
    """Cells are HTML already (escaped by the caller); the first `left` columns are left-aligned."""
    head = "".join(f'<th class="l">{h}</th>' if i < left else f"<th>{h}</th>" for i, h in enumerate(header))
    body = "".join(
        "<tr>"
        + "".join(f'<td class="l">{c}</td>' if i < left else f"<td>{c}</td>" for i, c in enumerate(row))
        + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _image(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{e(alt)}" src="data:image/png;base64,{data}">'


def _status(fr: FacilityRound) -> str:
    css = {"merged": "ok", "rejected": "bad", "left out": "bad", "failed": "bad", "stopped": "bad"}.get(fr.status, "")
    return f'<span class="{css}">{e(fr.status)}</span>'


def _phase_seconds(fr: FacilityRound, now: float | None = None) -> dict[str, float]:
    """Seconds per phase of a facility's round; a phase still going counts until `now` (if given)."""
    out: dict[str, float] = {}
    if fr.job is not None:
        for phase, start, end in phases(fr.job, now):
            out[phase] = out.get(phase, 0.0) + end - start
    return out


def _summary(view: RunView) -> str:
    losses = [r.eval_loss for r in view.rounds if r.eval_loss is not None]
    done = [r for r in view.rounds if r.complete]
    moved = sum((f.bytes_down or 0) + (f.bytes_up or 0) for r in view.rounds for f in r.facilities.values())
    cards = [
        ("status", view.status + (f" (attempt {view.attempt})" if view.attempt > 1 else "")),
        ("rounds done", f"{len(done)} of {view.last_round}"),
        (
            "global held-out loss",
            f"{num(view.baseline_loss)} → {num(losses[-1])}" if losses else num(view.baseline_loss),
        ),
        ("bytes moved", size(moved)),
        ("facilities", str(len(view.facilities))),
    ]
    if view.current_round is not None:
        cards.insert(1, ("round in progress", str(view.current_round)))
    body = "".join(f'<div class="card">{e(k)}<b>{e(v)}</b></div>' for k, v in cards)
    message = f'<p class="bad">{e(view.message)}</p>' if view.message else ""
    return f'<div class="cards">{body}</div>{message}'


def _rounds_table(view: RunView) -> str:
    rows = []
    if view.baseline_loss is not None:
        rows.append([str(view.first_round - 1) + " (initial)", num(view.baseline_loss), "-", "-", "-", "-", "-"])
    for r in view.rounds:
        merged = [f.facility for f in r.facilities.values() if f.status == "merged"]
        change = r.change or {}
        rows.append(
            [
                str(r.round),
                num(r.eval_loss),
                e(r.strategy or "-"),
                e(", ".join(merged) or "-"),
                num(r.update_norm),
                e(f"{change.get('kind', '-')} {change.get('encoding', '')}".strip()) + f" ({size(change.get('bytes'))})"
                if change
                else "-",
                f"<code>{e(r.fingerprint or '-')}</code>",
            ]
        )
    return _table(
        ["round", "global held-out loss", "strategy", "merged", "update norm", "change sent", "global model"], rows
    )


def _facility_table(view: RunView) -> str:
    rows = []
    for r in view.rounds:
        for fr in r.facilities.values():
            rows.append(
                [
                    str(r.round),
                    e(fr.facility),
                    _status(fr),
                    "-" if fr.samples is None else str(fr.samples),
                    "-" if fr.steps is None else str(fr.steps),
                    num(fr.weight, ".3f"),
                    f"{num(fr.train_first)} → {num(fr.train_last)}",
                    f"{num(fr.held_before)} → {num(fr.held_after)}",
                    num(fr.delta_norm),
                    f"<code>{e(fr.update_digest or '-')}</code>",
                ]
            )
    return _table(
        [
            "round",
            "facility",
            "status",
            "samples",
            "steps",
            "weight",
            "train loss first → last",
            "own held-out before → after",
            "update norm",
            "update digest",
        ],
        rows,
        left=3,
    )


def _time_table(view: RunView) -> str:
    rows = []
    now = time.time() if view.status == "running" else None
    for r in view.rounds:
        for fr in r.facilities.values():
            p = _phase_seconds(fr, now)
            waiting = fr.job is not None and fr.job.end is None and fr.job.queued < 0
            queued = seconds(p.get("queue wait")) + (" (still waiting)" if waiting else "")
            rows.append(
                [
                    str(r.round),
                    e(fr.facility),
                    seconds(p.get("staging in")),
                    queued,
                    seconds(p.get("training")),
                    seconds(p.get("staging out")),
                    "",
                ]
            )
        agg = r.aggregate_job.seconds if r.aggregate_job else None
        ev = r.evaluate_job.seconds if r.evaluate_job else None
        rows.append(
            [str(r.round), "<i>aggregator</i>", "", "", "", "", f"aggregation {seconds(agg)}, evaluation {seconds(ev)}"]
        )
    return _table(["round", "where", "staging in", "queue wait", "training", "staging out", "aggregator"], rows, left=2)


def _bytes_table(view: RunView) -> str:
    rows = []
    totals: dict[str, int] = {}
    for r in view.rounds:
        for fr in r.facilities.values():
            moved = (fr.bytes_down or 0) + (fr.bytes_up or 0)
            totals[fr.facility] = totals.get(fr.facility, 0) + moved
            rows.append(
                [
                    str(r.round),
                    e(fr.facility),
                    f"{size(fr.bytes_down)} ({e(fr.down_kind or '-')})",
                    f"{size(fr.bytes_up)}" + (f" ({e(fr.encoding)})" if fr.encoding else ""),
                    size(moved),
                ]
            )
    for name, total in totals.items():
        rows.append(["all", e(name), "", "", f"<b>{size(total)}</b>"])
    rows.append(["all", "<i>every facility</i>", "", "", f"<b>{size(sum(totals.values()))}</b>"])
    return _table(["round", "facility", "to the facility", "from the facility (update)", "total"], rows, left=2)


def _left_out_table(view: RunView) -> str:
    rows = [
        [str(r.round), e(fr.facility), _status(fr), e(fr.reason or "-")]
        for r in view.rounds
        for fr in r.facilities.values()
        if fr.status in ("left out", "rejected", "failed", "stopped")
    ]
    if not rows:
        return "<p>Every facility took part in every round so far.</p>"
    return _table(["round", "facility", "what", "why"], rows, left=4)


def render(view: RunView, images: dict[str, Path]) -> str:
    generated = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    picture = {name: _image(path, name) for name, path in images.items()}
    identity = _table(["", "value"], [[e(k), f"<code>{e(v)}</code>"] for k, v in view.identity], left=2)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>xffl-cwl report: {e(view.name)}</title><style>{STYLE}</style></head><body>",
        f"<h1>Federation <code>{e(view.name)}</code></h1>",
        f'<p class="muted">Run folder <code>{e(view.root)}</code>; report made {e(generated)} by <code>xffl-cwl report</code>.</p>',
        _summary(view),
        "<h2>Global model</h2>",
        picture["global_loss.png"],
        _rounds_table(view),
        "<h2>Facilities</h2>",
        picture["facility_loss.png"],
        _facility_table(view),
        "<h2>Left out and rejected</h2>",
        _left_out_table(view),
        "<h2>Time</h2>",
        picture["timeline.png"],
        _time_table(view),
        "<h2>Bytes moved</h2>",
        picture["bytes.png"],
        _bytes_table(view),
        "<h2>Update norms</h2>",
        picture["update_norms.png"],
        "<h2>Identity</h2>",
        identity,
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def report_data(view: RunView) -> dict:
    """The page's numbers as JSON (report.json), for scripts and tests."""
    return {
        "name": view.name,
        "status": view.status,
        "baseline_loss": view.baseline_loss,
        "rounds": [
            {
                "round": r.round,
                "eval_loss": r.eval_loss,
                "complete": r.complete,
                "update_norm": r.update_norm,
                "fingerprint": r.fingerprint,
                "aggregation_seconds": r.aggregate_job.seconds if r.aggregate_job else None,
                "evaluation_seconds": r.evaluate_job.seconds if r.evaluate_job else None,
                "facilities": {
                    f.facility: {
                        "status": f.status,
                        "reason": f.reason,
                        "train_loss": [f.train_first, f.train_last],
                        "held_out": [f.held_before, f.held_after],
                        "delta_norm": f.delta_norm,
                        "bytes_down": f.bytes_down,
                        "down_kind": f.down_kind,
                        "bytes_up": f.bytes_up,
                        "update_digest": f.update_digest,
                        "phases": _phase_seconds(f),
                    }
                    for f in r.facilities.values()
                },
            }
            for r in view.rounds
        ],
        "identity": dict(view.identity),
    }


def write_report(root: Path, out: Path | None = None) -> tuple[Path, RunView]:
    """Write RUN/report/ (or `out`); the page's path, and the view it showed (for the RO-Crate)."""
    root = Path(root).resolve()
    out = Path(out).resolve() if out else root / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    digests = Digests(out / DIGEST_CACHE)
    view = read_run(root, digests)
    images = {name: draw(view, out / name) for name, draw in PLOTS.items()}
    write_text_atomic(out / "report.json", json.dumps(report_data(view), indent=2, allow_nan=False) + "\n")
    page = out / PAGE
    write_text_atomic(page, render(view, images))
    digests.save()
    return page, view
