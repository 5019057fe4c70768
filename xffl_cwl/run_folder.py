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

from xffl_cwl.errors import InputError

DEPLOYMENT_NAME = re.compile(r"^[a-z][a-zA-Z0-9._-]*$")


@dataclass(frozen=True)
class RunFolder:
    root: Path
    workflow_name: str
    main: Path
    settings: Path
    deployments: dict[str, dict[str, Any]]
    bindings: list[tuple[str, str]]  # (step path, deployment)
    port_bindings: list[dict[str, Any]]

    def deployment_of(self, step: str) -> str | None:
        """The most specific binding covering `step` (StreamFlow's rule: prefixes are inherited)."""
        best: tuple[int, str] | None = None
        for path, deployment in self.bindings:
            if step == path or step.startswith(path.rstrip("/") + "/") or path == "/":
                if best is None or len(path) > best[0]:
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
        raise InputError(f"run folder {root} does not exist; create it with `xffl-cwl generate federation.yml -o {root}`")
    config = _yaml(root / "streamflow.yml")
    try:
        (name, workflow), *others = config["workflows"].items()
        main = root / workflow["config"]["file"]
        settings = root / workflow["config"]["settings"]
        bindings = [(b["step"], b["target"]["deployment"]) for b in workflow.get("bindings", []) if "step" in b]
        port_bindings = [b for b in workflow.get("bindings", []) if "port" in b]
        deployments = dict(config.get("deployments") or {})
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise InputError(f"{root / 'streamflow.yml'} lacks workflows.<name>.config.file/settings or bindings") from exc
    if others:
        raise InputError(f"{root / 'streamflow.yml'} defines several workflows; xffl-cwl runs folders with one")
    return RunFolder(root, name, main, settings, deployments, bindings, port_bindings)


def _fragment(uri: str) -> str:
    return uri.rsplit("#", 1)[-1].rsplit("/", 1)[-1]


def step_paths(main: Path) -> list[str]:
    """Every step of the workflow as StreamFlow names it: /step, /step/inner_step, ..."""
    from cwl_utils.parser import load_document_by_uri

    try:
        document = load_document_by_uri(str(Path(main).resolve()))
    except Exception as exc:  # cwl-utils raises several types; all mean "this CWL does not load"
        raise InputError(f"{main} does not load as CWL: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc

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
            problems.append(f"binding {step} (to {deployment}) names no step of the workflow; StreamFlow would run that step on the local machine")
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
            problems.append(f"step {step} has no binding; add one to streamflow.yml (it would run on the local machine)")
    return problems


def job_order(folder: RunFolder) -> dict[str, Any]:
    order = _yaml(folder.settings)
    if not isinstance(order, dict):
        raise InputError(f"{folder.settings} must be a mapping of workflow inputs")
    return order


def preflight_targets(folder: RunFolder):
    """The facilities the run uses (every deployment a binding names), ready for xffl_cwl.preflight."""
    from xffl_cwl.preflight import targets_from_streamflow

    names = list(dict.fromkeys(d for _, d in folder.bindings if d in folder.deployments))
    config = {"deployments": folder.deployments}
    return targets_from_streamflow(config, folder.port_bindings, job_order(folder), folder.root, names)
