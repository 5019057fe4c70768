"""streamflow.yml: one deployment per facility plus the aggregator's, and a binding for every step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from xffl_cwl.federation.spec import Deployment, FederationSpec, LocalDeployment
from xffl_cwl.generator.workflows import train_step_id

AGGREGATOR = "aggregator"
DATABASE = ".streamflow/sqlite.db"
# Steps that run next to the aggregator: the baseline evaluation and, each round, aggregate and evaluate.
AGGREGATOR_STEPS = ("/baseline", "/federation/aggregate", "/federation/evaluate")


def workdir_of(name: str, deployment: Deployment) -> str:
    """Local workdirs default to work/<name> inside the run folder (relative, so the folder can move)."""
    if isinstance(deployment, LocalDeployment) and deployment.workdir is None:
        return f"work/{name}"
    return str(deployment.workdir)


def deployment_entry(name: str, deployment: Deployment) -> dict[str, Any]:
    return {"type": "local", "config": {}, "workdir": workdir_of(name, deployment)}


def bindings(spec: FederationSpec) -> list[tuple[str, str]]:
    """(step path, deployment) pairs, in the order they appear in the workflow."""
    pairs = [("/baseline", AGGREGATOR)]
    pairs += [(f"/federation/{train_step_id(f.name)}", f.name) for f in spec.facilities]
    pairs += [("/federation/aggregate", AGGREGATOR), ("/federation/evaluate", AGGREGATOR)]
    return pairs


def build_streamflow_config(spec: FederationSpec) -> dict[str, Any]:
    deployments = {AGGREGATOR: deployment_entry(AGGREGATOR, spec.aggregator)}
    deployments |= {f.name: deployment_entry(f.name, f.deployment) for f in spec.facilities}
    return {
        "version": "v1.0",
        "workflows": {
            spec.name: {
                "type": "cwl",
                "config": {
                    "file": "main.cwl",
                    "settings": "inputs.yml",
                    # The tools run on the bound target as they are; containers are the facility's business.
                    "docker": [{"step": "/", "deployment": {"type": "none", "config": {}}}],
                },
                "bindings": [{"step": step, "target": {"deployment": deployment}} for step, deployment in bindings(spec)],
            }
        },
        "deployments": deployments,
        "database": {"type": "default", "config": {"connection": DATABASE}},
    }


def job_order(spec: FederationSpec) -> dict[str, Any]:
    """inputs.yml: the data locations and the number of rounds."""

    def location(path: str | Path) -> dict[str, str]:
        p = Path(path)
        kind = "Directory" if p.is_dir() or (not p.exists() and p.suffix == "") else "File"
        return {"class": kind, "path": str(path)}

    order: dict[str, Any] = {"model": location(spec.model), "rounds": spec.rounds}
    if spec.test_set is not None:
        order["test_set"] = location(spec.test_set)
    for facility in spec.facilities:
        order[f"dataset_{facility.name}"] = location(facility.dataset)
    return order
