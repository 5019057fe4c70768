"""A run as an RO-Crate (Workflow Run Crate profile 0.5): what ran, on what, producing what, and when.

`streamflow prov` (0.2.0rc3) stops with `KeyError: 'alternateName'` on our runs (its run_crate.py,
`_rename_parts`, on the Directory outputs), so the crate is written here from the same files the
report reads. It holds the workflow (main.cwl, round.cwl, tools/), its inputs and deployment file,
the federation.yml it was generated from, the final history, each round's aggregate.json and each
update.json the aggregator received; models and updates are named by their digests, not copied.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from xffl_cwl.contract.layout import (
    AGGREGATE_JSON,
    FEDERATION_SOURCE,
    HISTORY_JSONL,
    INPUTS_YML,
    MAIN_CWL,
    OUT_DIR,
    ROUND_CWL,
    STREAMFLOW_YML,
    TOOLS_DIR,
    UPDATE_JSON,
)
from xffl_cwl.report.run_view import RoundView, RunView
from xffl_cwl.report.timeline import Job

METADATA = "ro-crate-metadata.json"
RECORD_LIMIT = 4 << 20  # a record larger than this (a facility's update.json can be anything) is not copied
PROFILES = {
    "process": "https://w3id.org/ro/wfrun/process/0.5",
    "workflow": "https://w3id.org/ro/wfrun/workflow/0.5",
    "wroc": "https://w3id.org/workflowhub/workflow-ro-crate/1.0",
}
STATUS = {
    "finished": "http://schema.org/CompletedActionStatus",
    "running": "http://schema.org/ActiveActionStatus",
}


def _iso(seconds: float | None) -> str | None:
    return None if seconds is None else datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds")


def _ref(identifier: str) -> dict[str, str]:
    return {"@id": identifier}


class _Crate:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.graph: dict[str, dict[str, Any]] = {}

    def add(self, at: str, kind: str | list[str], **properties: Any) -> str:
        """An entity `at` (its @id); properties that are None or empty are left out."""
        entity = {"@id": at, "@type": kind}
        entity.update({k: v for k, v in properties.items() if v not in (None, [], "")})
        self.graph[at] = entity
        return at

    def file(self, source: Path, at: str, kind: str | list[str] = "File", **properties: Any) -> str | None:
        """A copy of `source` in the crate at `at`; None (and nothing added) when there is no such file."""
        if not source.is_file() or source.stat().st_size > RECORD_LIMIT:
            return None
        target = self.root / at
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        return self.add(at, kind, contentSize=str(target.stat().st_size), **properties)


def _job_name(job: Job) -> str:
    if job.tool == "train":
        return f"train at {job.facility}, round {job.round}"
    return f"{job.tool}, round {job.round}" if job.round else f"{job.tool}, initial model"


def _status(job: Job, succeeded: bool) -> str:
    if job.end is None:
        return "http://schema.org/ActiveActionStatus"
    return f"http://schema.org/{'Completed' if succeeded else 'Failed'}ActionStatus"


class _RunCrate(_Crate):
    """The crate of one run: the workflow's entities once, then one round at a time."""

    def __init__(self, view: RunView, out: Path) -> None:
        super().__init__(out)
        self.view = view
        self.tools: dict[str, str | None] = {}
        self.steps: list[str] = []
        self.models: dict[int, str] = {}  # round -> the global model made by it (first_round - 1: the initial one)
        self.actions: list[str] = []
        self.controls: list[str] = []
        self.round_cwl: str | None = None
        self.main: str | None = None

    def workflow(self) -> None:
        """main.cwl (the main entity), round.cwl and the tools, in CWL."""
        root = self.view.root
        cwl = self.add(
            "#cwl",
            "ComputerLanguage",
            name="Common Workflow Language",
            alternateName="CWL",
            identifier=_ref("https://w3id.org/cwl/v1.2/"),
            url=_ref("https://www.commonwl.org/"),
            version="v1.2",
        )
        workflow = ["File", "SoftwareSourceCode", "ComputationalWorkflow"]
        for path in sorted((root / TOOLS_DIR).glob("*.cwl")):
            self.tools[path.stem] = self.file(
                path, f"{TOOLS_DIR}/{path.name}", ["File", "SoftwareApplication"], name=f"xffl-cwl {path.stem}"
            )
        self.round_cwl = self.file(root / ROUND_CWL, ROUND_CWL, workflow, programmingLanguage=_ref(cwl))
        self.main = self.file(
            root / MAIN_CWL,
            MAIN_CWL,
            workflow,
            name=f"federation {self.view.name}",
            programmingLanguage=_ref(cwl),
            hasPart=[_ref(i) for i in [self.round_cwl, *self.tools.values()] if i],
        )

    def step(self, name: str, tool: str) -> str:
        """A step of round.cwl (added once), and what runs it."""
        at = f"{ROUND_CWL}#{name}"
        if at not in self.graph:
            tool_file = self.tools.get(tool)
            self.steps.append(self.add(at, "HowToStep", name=name, workExample=_ref(tool_file) if tool_file else None))
            if self.round_cwl:
                self.graph[self.round_cwl]["step"] = [_ref(i) for i in self.steps]
        return at

    def job(self, at: str, job: Job, step: str, succeeded: bool, **properties: Any) -> str:
        """A tool's run (CreateAction) and the ControlAction that ties it to its step."""
        tool_file = self.tools.get(job.tool)
        action = self.add(
            at,
            "CreateAction",
            name=_job_name(job),
            instrument=_ref(tool_file) if tool_file else None,
            startTime=_iso(job.start),
            endTime=_iso(job.end),
            actionStatus=_status(job, succeeded),
            **properties,
        )
        self.actions.append(action)
        control = self.add(f"#control-{at[1:]}", "ControlAction", instrument=_ref(self.step(step, job.tool)))
        self.graph[control]["object"] = _ref(action)
        self.controls.append(control)
        return action

    def model(self, round_number: int, fingerprint: str, name: str, record: str | None = None) -> str:
        self.models[round_number] = self.add(
            f"#model-round-{round_number}",
            "Dataset",
            name=name,
            identifier=fingerprint,
            subjectOf=_ref(record) if record else None,
        )
        return self.models[round_number]

    def one_round(self, r: RoundView) -> None:
        """Each facility's training (its update named by digest, its update.json as received), then the aggregation."""
        base = [_ref(self.models[r.round - 1])] if r.round - 1 in self.models else []
        received = {Path(v).name: Path(v) for v in (r.aggregate_job.option("--update") if r.aggregate_job else [])}
        updates = []
        for fr in r.facilities.values():
            if fr.job is None:
                continue
            update = None
            if fr.status in ("merged", "rejected"):
                record = None
                if fr.facility in received:
                    record = self.file(
                        received[fr.facility] / UPDATE_JSON,
                        f"rounds/{r.round}/updates/{fr.facility}/{UPDATE_JSON}",
                        name=f"{fr.facility}'s record of round {r.round} (as received, untrusted)",
                    )
                update = self.add(
                    f"#update-{fr.facility}-round-{r.round}",
                    "Dataset",
                    name=f"update from {fr.facility}, round {r.round} ({fr.status})",
                    identifier=fr.update_digest,
                    contentSize=str(fr.bytes_up) if fr.bytes_up is not None else None,
                    subjectOf=_ref(record) if record else None,
                )
                updates.append(_ref(update))
            image = (fr.container or {}).get("image")
            self.job(
                f"#job-train-{fr.facility}-round-{r.round}",
                fr.job,
                f"train_{fr.facility}",
                fr.job.outcome == "done",
                error=fr.reason or None,
                object=base,
                result=[_ref(update)] if update else [],
                containerImage=image if image and image != "none" else None,
                location=fr.job.deployment,
            )
        if r.fingerprint:
            record = None
            if r.model is not None:
                record = self.file(
                    r.model / AGGREGATE_JSON,
                    f"rounds/{r.round}/{AGGREGATE_JSON}",
                    name=f"round {r.round}'s aggregation",
                )
            self.model(r.round, r.fingerprint, f"global model after round {r.round}", record)
        if r.aggregate_job is not None:
            self.job(
                f"#job-aggregate-round-{r.round}",
                r.aggregate_job,
                "aggregate",
                bool(r.fingerprint),
                object=updates + base,
                result=[_ref(self.models[r.round])] if r.round in self.models else [],
            )


def build(view: RunView, out: Path) -> None:
    """Fill `out` (an empty directory) with the crate."""
    from xffl_cwl import __version__

    crate = _RunCrate(view, out)
    root = view.root
    crate.workflow()
    inputs = crate.file(root / INPUTS_YML, INPUTS_YML, name="job order")
    deployment = crate.file(root / STREAMFLOW_YML, STREAMFLOW_YML, name="StreamFlow deployments and bindings")
    source = crate.file(root / FEDERATION_SOURCE, "federation.yml", name="federation.yml the run folder was made from")
    engine = crate.add(
        "#streamflow",
        "SoftwareApplication",
        name="StreamFlow",
        version=dict(view.identity).get("streamflow (orchestrator)"),
    )
    xffl = crate.add("#xffl-cwl", "SoftwareApplication", name="xffl-cwl", version=__version__)
    first = next((r for r in view.rounds if r.base_fingerprint), None)
    if first is not None and first.base_fingerprint:
        crate.model(view.first_round - 1, first.base_fingerprint, "initial global model")
    history = crate.file(root / OUT_DIR / HISTORY_JSONL, HISTORY_JSONL, name="global held-out loss per round")
    for r in view.rounds:
        crate.one_round(r)
    final = crate.models.get(max(crate.models)) if crate.models else None
    initial = crate.models.get(view.first_round - 1)
    run = crate.add(
        "#run",
        "CreateAction",
        name=f"xffl-cwl run of federation {view.name}",
        instrument=_ref(crate.main) if crate.main else None,
        startTime=_iso(view.timeline.started),
        endTime=_iso(view.timeline.last_line) if view.status != "running" else None,
        actionStatus=STATUS.get(view.status, "http://schema.org/FailedActionStatus"),
        error=view.message or None,
        object=[_ref(i) for i in (inputs, deployment, source, initial) if i],
        result=[_ref(i) for i in (final, history) if i],
    )
    organize = crate.add(
        "#orchestration",
        "OrganizeAction",
        name="StreamFlow run, supervised by xffl-cwl run",
        instrument=[_ref(engine), _ref(xffl)],
        result=_ref(run),
        object=[_ref(c) for c in crate.controls],
        startTime=_iso(view.timeline.started),
    )
    files = [
        i for i, e in crate.graph.items() if "File" in (e["@type"] if isinstance(e["@type"], list) else [e["@type"]])
    ]
    crate.add(
        "./",
        "Dataset",
        name=f"xffl-cwl federation {view.name}",
        description="A federated fine-tuning run: its workflow, inputs, per-round records and the digests of every model and update.",
        datePublished=datetime.now(UTC).isoformat(timespec="seconds"),
        license=_ref("https://spdx.org/licenses/Apache-2.0"),
        conformsTo=[_ref(p) for p in PROFILES.values()],
        mainEntity=_ref(crate.main) if crate.main else None,
        hasPart=[_ref(i) for i in files],
        mentions=[_ref(run), *(_ref(a) for a in crate.actions), _ref(organize)],
    )
    for name, url in PROFILES.items():
        crate.add(url, "CreativeWork", name=f"{name} profile", version=url.rsplit("/", 1)[-1])
    crate.add("https://spdx.org/licenses/Apache-2.0", "CreativeWork", name="Apache License 2.0")
    crate.add(METADATA, "CreativeWork", about=_ref("./"), conformsTo=_ref("https://w3id.org/ro/crate/1.1"))
    document = {"@context": "https://w3id.org/ro/crate/1.1/context", "@graph": list(crate.graph.values())}
    (out / METADATA).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


def export_crate(view: RunView, out: Path) -> Path:
    """Write the crate of `view` to `out` (replaced whole: built beside it, then renamed)."""
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        build(view, tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
