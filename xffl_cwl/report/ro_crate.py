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
from xffl_cwl.execution.run_state import completed_rounds
from xffl_cwl.report.run_view import Digests, RunView, read_run
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


def build(view: RunView, out: Path) -> None:
    """Fill `out` (an empty directory) with the crate."""
    from xffl_cwl import __version__

    crate = _Crate(out)
    root = view.root
    cwl = crate.add(
        "#cwl",
        "ComputerLanguage",
        name="Common Workflow Language",
        alternateName="CWL",
        identifier=_ref("https://w3id.org/cwl/v1.2/"),
        url=_ref("https://www.commonwl.org/"),
        version="v1.2",
    )
    tools = {}
    for path in sorted((root / TOOLS_DIR).glob("*.cwl")):
        tools[path.stem] = crate.file(
            path, f"{TOOLS_DIR}/{path.name}", ["File", "SoftwareApplication"], name=f"xffl-cwl {path.stem}"
        )
    round_cwl = crate.file(root / ROUND_CWL, ROUND_CWL, ["File", "SoftwareSourceCode", "ComputationalWorkflow"])
    main = crate.file(
        root / MAIN_CWL,
        MAIN_CWL,
        ["File", "SoftwareSourceCode", "ComputationalWorkflow"],
        name=f"federation {view.name}",
        programmingLanguage=_ref(cwl),
        hasPart=[_ref(i) for i in [round_cwl, *tools.values()] if i],
    )
    steps: list[str] = []

    def step(name: str, tool: str) -> str:
        """A step of round.cwl, once."""
        identifier = f"{ROUND_CWL}#{name}"
        if identifier not in crate.graph:
            steps.append(
                crate.add(
                    identifier, "HowToStep", name=name, workExample=_ref(tools[tool]) if tools.get(tool) else None
                )
            )
            if round_cwl:
                crate.graph[round_cwl]["step"] = [_ref(i) for i in steps]
        return identifier

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
    models: dict[int, str] = {}
    first = next((r for r in view.rounds if r.base_fingerprint), None)
    if first is not None:
        models[view.first_round - 1] = crate.add(
            f"#model-round-{view.first_round - 1}",
            "Dataset",
            name="initial global model",
            identifier=first.base_fingerprint,
        )
    history = crate.file(root / OUT_DIR / HISTORY_JSONL, HISTORY_JSONL, name="global held-out loss per round")
    actions = []
    controls = []
    for r in view.rounds:
        updates = []
        for fr in r.facilities.values():
            job = fr.job
            if job is None:
                continue
            record = None
            if r.aggregate_job is not None:
                for value in r.aggregate_job.option("--update"):
                    if Path(value).name == fr.facility:
                        record = crate.file(
                            Path(value) / UPDATE_JSON,
                            f"rounds/{r.round}/updates/{fr.facility}/{UPDATE_JSON}",
                            name=f"{fr.facility}'s record of round {r.round} (as received, untrusted)",
                        )
            update = None
            if fr.status in ("merged", "rejected"):
                update = crate.add(
                    f"#update-{fr.facility}-round-{r.round}",
                    "Dataset",
                    name=f"update from {fr.facility}, round {r.round} ({fr.status})",
                    identifier=fr.update_digest,
                    contentSize=str(fr.bytes_up) if fr.bytes_up is not None else None,
                    subjectOf=_ref(record) if record else None,
                )
                updates.append(update)
            image = fr.container.get("image") if fr.container else None
            action = crate.add(
                f"#job-train-{fr.facility}-round-{r.round}",
                "CreateAction",
                name=_job_name(job),
                instrument=_ref(tools["train"]) if tools.get("train") else None,
                startTime=_iso(job.start),
                endTime=_iso(job.end),
                actionStatus="http://schema.org/CompletedActionStatus"
                if job.outcome == "done"
                else "http://schema.org/FailedActionStatus"
                if job.end is not None
                else "http://schema.org/ActiveActionStatus",
                error=fr.reason or None,
                object=[_ref(models[r.round - 1])] if r.round - 1 in models else [],
                result=[_ref(update)] if update else [],
                containerImage=image if image and image != "none" else None,
                agent=None,
                location=job.deployment,
            )
            actions.append(action)
            controls.append(
                crate.add(
                    f"#control-train-{fr.facility}-round-{r.round}",
                    "ControlAction",
                    instrument=_ref(step(f"train_{fr.facility}", "train")),
                    object=_ref(action),
                )
            )
        if r.fingerprint:
            aggregate_record = None
            done = completed_rounds(root).get(r.round)
            if done is not None:
                aggregate_record = crate.file(
                    root / done.model / AGGREGATE_JSON,
                    f"rounds/{r.round}/{AGGREGATE_JSON}",
                    name=f"round {r.round}'s aggregation",
                )
            models[r.round] = crate.add(
                f"#model-round-{r.round}",
                "Dataset",
                name=f"global model after round {r.round}",
                identifier=r.fingerprint,
                subjectOf=_ref(aggregate_record) if aggregate_record else None,
            )
        job = r.aggregate_job
        if job is not None:
            action = crate.add(
                f"#job-aggregate-round-{r.round}",
                "CreateAction",
                name=_job_name(job),
                instrument=_ref(tools["aggregate"]) if tools.get("aggregate") else None,
                startTime=_iso(job.start),
                endTime=_iso(job.end),
                actionStatus="http://schema.org/CompletedActionStatus"
                if r.fingerprint
                else "http://schema.org/FailedActionStatus",
                object=[_ref(u) for u in updates] + ([_ref(models[r.round - 1])] if r.round - 1 in models else []),
                result=[_ref(models[r.round])] if r.round in models else [],
            )
            actions.append(action)
            controls.append(
                crate.add(
                    f"#control-aggregate-round-{r.round}",
                    "ControlAction",
                    instrument=_ref(step("aggregate", "aggregate")),
                    object=_ref(action),
                )
            )
    run_status = STATUS.get(view.status, "http://schema.org/FailedActionStatus")
    final = models.get(max(models)) if models else None
    run = crate.add(
        "#run",
        "CreateAction",
        name=f"xffl-cwl run of federation {view.name}",
        instrument=_ref(main) if main else None,
        startTime=_iso(view.timeline.started),
        endTime=_iso(view.timeline.last_line) if view.status != "running" else None,
        actionStatus=run_status,
        error=view.message or None,
        object=[_ref(i) for i in (inputs, deployment, source) if i]
        + ([_ref(models[view.first_round - 1])] if view.first_round - 1 in models else []),
        result=[_ref(i) for i in (final, history) if i],
    )
    organize = crate.add(
        "#orchestration",
        "OrganizeAction",
        name="StreamFlow run, supervised by xffl-cwl run",
        instrument=[_ref(engine), _ref(xffl)],
        result=_ref(run),
        object=[_ref(c) for c in controls],
        startTime=_iso(view.timeline.started),
    )
    crate.add(
        "./",
        "Dataset",
        name=f"xffl-cwl federation {view.name}",
        description="A federated fine-tuning run: its workflow, inputs, per-round records and the digests of every model and update.",
        datePublished=datetime.now(UTC).isoformat(timespec="seconds"),
        license=_ref("https://spdx.org/licenses/Apache-2.0"),
        conformsTo=[_ref(p) for p in PROFILES.values()],
        mainEntity=_ref(main) if main else None,
        hasPart=[
            _ref(i)
            for i, e in crate.graph.items()
            if ("File" in e["@type"] if isinstance(e["@type"], list) else e["@type"] == "File")
        ],
        mentions=[_ref(run), *(_ref(a) for a in actions), _ref(organize)],
    )
    for name, url in PROFILES.items():
        crate.add(url, "CreativeWork", name=f"{name} profile", version=url.rsplit("/", 1)[-1])
    crate.add("https://spdx.org/licenses/Apache-2.0", "CreativeWork", name="Apache License 2.0")
    crate.add(METADATA, "CreativeWork", about=_ref("./"), conformsTo=_ref("https://w3id.org/ro/crate/1.1"))
    document = {"@context": "https://w3id.org/ro/crate/1.1/context", "@graph": list(crate.graph.values())}
    (out / METADATA).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


def export_crate(root: Path, out: Path, digests: Digests | None = None) -> Path:
    """Write the crate to `out` (replaced whole: built beside it, then renamed)."""
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    view = read_run(root, digests)
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
