"""What a run folder holds, read from its files (which a person may have edited since generation).

Steps come from the CWL (via cwl-utils, so map and list forms both work); deployments and
bindings from streamflow.yml. `check_bindings` finds what StreamFlow only warns about: a binding
that names no step (the step then silently runs on the local machine) and steps bound nowhere.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xffl_cwl.contract.facility import FacilityConfig
from xffl_cwl.contract.layout import (
    AGGREGATE_STEP,
    FACILITY_CONNECTOR,
    ROUND_CWL,
    STREAMFLOW_YML,
    TRAIN_STEP_PREFIX,
    dataset_input_id,
)
from xffl_cwl.errors import InputError

DEPLOYMENT_NAME = re.compile(r"^[a-z][a-zA-Z0-9._-]*$")


@dataclass(frozen=True)
class RunFolder:
    root: Path
    main: Path
    settings: Path
    deployments: dict[str, dict[str, Any]]
    bindings: list[tuple[str, str]]  # (step path, deployment)
    port_bindings: list[dict[str, Any]]

    @property
    def config_name(self) -> str:
        return STREAMFLOW_YML

    def deployment_of(self, step: str) -> str | None:
        """The most specific binding covering `step` (StreamFlow's rule: prefixes are inherited)."""
        best: tuple[int, str] | None = None
        for path, deployment in self.bindings:
            covers = step == path or step.startswith(path.rstrip("/") + "/") or path == "/"
            if covers and (best is None or len(path) > best[0]):
                best = (len(path), deployment)
        return best[1] if best else None


def _yaml(path: Path) -> Any:
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    try:
        return YAML(typ="safe", pure=True).load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise InputError(f"{path} is missing; is {path.parent} a run folder made by `xffl-cwl generate`?") from exc
    except YAMLError as exc:
        raise InputError(f"{path} is not valid YAML ({str(exc).splitlines()[0]})") from exc


def read_run_folder(root: Path) -> RunFolder:
    root = Path(root)
    if not root.is_dir():
        raise InputError(
            f"run folder {root} does not exist; create it with `xffl-cwl generate federation.yml -o {root}`"
        )
    config = _yaml(root / STREAMFLOW_YML)
    try:
        (_, workflow), *others = config["workflows"].items()
        main = root / workflow["config"]["file"]
        settings = root / workflow["config"]["settings"]
        bindings = [(b["step"], b["target"]["deployment"]) for b in workflow.get("bindings", []) if "step" in b]
        port_bindings = [b for b in workflow.get("bindings", []) if "port" in b]
        deployments = dict(config.get("deployments") or {})
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise InputError(f"{root / STREAMFLOW_YML} lacks workflows.<name>.config.file/settings or bindings") from exc
    if others:
        raise InputError(f"{root / STREAMFLOW_YML} defines several workflows; xffl-cwl runs folders with one")
    return RunFolder(root, main, settings, deployments, bindings, port_bindings)


def _fragment(uri: str) -> str:
    return uri.rsplit("#", 1)[-1].rsplit("/", 1)[-1]


def step_paths(main: Path) -> list[str]:
    """Every step of the workflow as StreamFlow names it: /step, /step/inner_step, ..."""
    from cwl_utils.parser import load_document_by_uri

    try:
        document = load_document_by_uri(str(Path(main).resolve()))
    except Exception as exc:  # cwl-utils raises several types; all mean "this CWL does not load"
        raise InputError(
            f"{main} does not load as CWL: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from exc

    def walk(process: Any, prefix: str) -> list[str]:
        paths = []
        for step in getattr(process, "steps", None) or []:
            path = f"{prefix}/{_fragment(step.id)}"
            paths.append(path)
            run = step.run
            if isinstance(run, str):
                if not run.endswith(".cwl") and "#" in run:
                    continue
                run = load_document_by_uri(run)
            if getattr(run, "class_", None) == "Workflow":
                paths += walk(run, path)
        return paths

    return walk(document, "")


def tool_steps(paths: list[str]) -> list[str]:
    """Steps that run a command (the leaves), which are the ones that need a place to run."""
    return [p for p in paths if not any(other.startswith(p + "/") for other in paths)]


def check_bindings(folder: RunFolder, paths: list[str]) -> list[str]:
    """Problems StreamFlow would only warn about, or not notice at all."""
    problems = []
    for step, deployment in folder.bindings:
        if step != "/" and step not in paths:
            problems.append(
                f"binding {step} (to {deployment}) names no step of the workflow; StreamFlow would run that step on the local machine"
            )
        if deployment not in folder.deployments:
            problems.append(f"binding {step} targets deployment {deployment!r}, which streamflow.yml does not define")
    for binding in folder.port_bindings:
        if binding.get("target", {}).get("deployment") not in folder.deployments:
            problems.append(f"port binding {binding['port']} targets a deployment that streamflow.yml does not define")
    for name in folder.deployments:
        if not DEPLOYMENT_NAME.fullmatch(name):
            problems.append(f"deployment name {name!r} is not valid for StreamFlow (^[a-z][a-zA-Z0-9._-]*$)")
    for step in tool_steps(paths):
        if folder.deployment_of(step) is None:
            problems.append(
                f"step {step} has no binding; add one to streamflow.yml (it would run on the local machine)"
            )
    return problems


def _is_optional(parameter: Any) -> bool:
    kind = getattr(parameter, "type_", None)
    return (
        getattr(parameter, "default", None) is not None or kind == "null" or (isinstance(kind, list) and "null" in kind)
    )


def check_inputs(folder: RunFolder, order: dict[str, Any]) -> list[str]:
    """Every required input of main.cwl is in inputs.yml; every local file or folder there exists."""
    from cwl_utils.parser import load_document_by_uri

    problems = []
    try:
        main = load_document_by_uri(str(folder.main.resolve()))
    except Exception:  # step_paths reports a main.cwl that does not load
        return problems
    ported = {b["port"].lstrip("/") for b in folder.port_bindings if isinstance(b.get("port"), str)}
    for parameter in main.inputs or []:
        name = _fragment(parameter.id)
        if name not in order and not _is_optional(parameter):
            problems.append(
                f"{folder.settings.name} has no value for the workflow input {name!r}; add `{name}: ...` to it"
            )
    for name, value in order.items():
        if name in ported or not isinstance(value, dict) or value.get("class") not in ("File", "Directory"):
            continue
        path = value.get("path") or value.get("location")
        if isinstance(path, str) and not path.startswith(("http://", "https://")):
            where = (folder.settings.parent / path.removeprefix("file://")).resolve()
            if not where.exists():
                problems.append(f"{folder.settings.name}: {name} is {where}, which does not exist; fix its path")
    return problems


def check_wiring(folder: RunFolder) -> list[str]:
    """round.cwl's aggregate step receives the update and the status of every train step."""
    round_file = folder.main.parent / ROUND_CWL
    try:
        steps = (_yaml(round_file) or {}).get("steps") or {}
    except InputError:
        return []
    if isinstance(steps, list):
        steps = {s.get("id"): s for s in steps if isinstance(s, dict)}
    aggregate = steps.get(AGGREGATE_STEP) or {}
    wired = aggregate.get("in") or {}
    if isinstance(wired, list):
        wired = {i.get("id"): i for i in wired if isinstance(i, dict)}

    def sources(key: str) -> list[str]:
        value = wired.get(key)
        source = value.get("source") if isinstance(value, dict) else value
        return [source] if isinstance(source, str) else list(source or [])

    problems = []
    for step in steps:
        if isinstance(step, str) and step.startswith(TRAIN_STEP_PREFIX):
            for output, key in (("update", "updates"), ("status", "statuses")):
                if f"{step}/{output}" not in sources(key):
                    problems.append(
                        f"{ROUND_CWL}: the {AGGREGATE_STEP} step does not receive {step}/{output}; add it to its "
                        f"`{key}` sources, or that facility is never merged"
                    )
    return problems


def check_run_folder(folder: RunFolder) -> list[str]:
    """Everything `xffl-cwl validate` checks without running cwltool or StreamFlow; `run` refuses the same."""
    paths = step_paths(folder.main)
    return check_bindings(folder, paths) + check_wiring(folder) + check_inputs(folder, read_job_order(folder))


def read_job_order(folder: RunFolder) -> dict[str, Any]:
    """inputs.yml as written (and perhaps edited since)."""
    order = _yaml(folder.settings)
    if not isinstance(order, dict):
        raise InputError(f"{folder.settings} must be a mapping of workflow inputs")
    return order


def facility_targets(folder: RunFolder):
    """The deployments the run uses (every one a binding names), ready for preflight."""
    from xffl_cwl.facility.preflight import FacilityTarget

    order = read_job_order(folder)
    ports = {b["port"].lstrip("/"): b.get("target") or {} for b in folder.port_bindings if "port" in b}
    targets = []
    for name in dict.fromkeys(d for _, d in folder.bindings if d in folder.deployments):
        entry = folder.deployments[name] or {}
        value = order.get(dataset_input_id(name))
        dataset = value.get("path") if isinstance(value, dict) else None
        port_workdir = (ports.get(dataset_input_id(name)) or {}).get("workdir")
        if dataset and port_workdir:
            dataset = str(Path(port_workdir) / dataset)
        if entry.get("type") == FACILITY_CONNECTOR:
            try:
                config = FacilityConfig.from_streamflow(entry.get("config") or {})
            except (TypeError, ValueError) as exc:
                raise InputError(f"{folder.root / STREAMFLOW_YML}: deployment {name}: {exc}") from exc
            targets.append(FacilityTarget(name, config, str(entry.get("workdir")), dataset, folder.root))
        else:
            if dataset:
                dataset = str((folder.root / dataset).resolve())
            targets.append(FacilityTarget(name, None, str(entry.get("workdir") or "."), dataset, folder.root))
    return targets
