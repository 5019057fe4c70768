"""streamflow.yml: one deployment per facility plus the aggregator's, and a binding for every step."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from ruamel.yaml.scalarstring import DoubleQuotedScalarString

from xffl_cwl.contract.layout import (
    AGGREGATE_STEP,
    AGGREGATOR,
    BASELINE_STEP,
    DATABASE,
    EVALUATE_STEP,
    FACILITY_CONNECTOR,
    INPUTS_YML,
    LOOP_STEP,
    MAIN_CWL,
    custom_template_path,
    dataset_input_id,
    local_workdir,
    step_path,
    train_step_id,
)
from xffl_cwl.facility.templates import is_template_file
from xffl_cwl.federation.spec import Deployment, FacilitySpec, FederationSpec, LocalDeployment, SlurmDeployment


def workdir_of(name: str, deployment: Deployment) -> str:
    """Local workdirs default to work/<name> inside the run folder (relative, so the folder can move)."""
    if isinstance(deployment, LocalDeployment) and deployment.workdir is None:
        return local_workdir(name)
    return str(deployment.workdir)


def _facility_config(name: str, d: SlurmDeployment, dataset: str | None) -> dict[str, Any]:
    facility = d.facility
    if is_template_file(facility.template):
        facility = replace(facility, template=custom_template_path(name))
    container = facility.container
    if (container.runtime or "") != "none":
        # The container must see the staged inputs (under the workdir) and the dataset, which stays in place.
        binds = [d.workdir] + ([str(Path(dataset).parent)] if dataset else [])
        facility = replace(facility, container=replace(container, bind=tuple(dict.fromkeys([*container.bind, *binds]))))
    config = facility.to_streamflow()
    if "time" in config.get("sbatch", {}):
        config["sbatch"]["time"] = DoubleQuotedScalarString(
            config["sbatch"]["time"]
        )  # 00:10:00 is a number to YAML 1.1
    return config


def deployment_entry(name: str, deployment: Deployment, dataset: str | None = None) -> dict[str, Any]:
    if isinstance(deployment, SlurmDeployment):
        return {
            "type": FACILITY_CONNECTOR,
            "config": _facility_config(name, deployment, dataset),
            "workdir": deployment.workdir,
        }
    return {"type": "local", "config": {}, "workdir": workdir_of(name, deployment)}


def _port_binding(facility: FacilitySpec) -> dict[str, Any]:
    """The dataset already lives on the facility: StreamFlow must not look for it here, nor copy it."""
    return {
        "port": "/" + dataset_input_id(facility.name),
        "target": {"deployment": facility.name, "workdir": str(Path(facility.dataset).parent)},
    }


def bindings(spec: FederationSpec) -> list[tuple[str, str]]:
    """(step path, deployment) pairs, in the order they appear in the workflow."""
    pairs = [(step_path(BASELINE_STEP), AGGREGATOR)]
    pairs += [(step_path(LOOP_STEP, train_step_id(f.name)), f.name) for f in spec.facilities]
    pairs += [(step_path(LOOP_STEP, AGGREGATE_STEP), AGGREGATOR), (step_path(LOOP_STEP, EVALUATE_STEP), AGGREGATOR)]
    return pairs


def build_streamflow_config(spec: FederationSpec) -> dict[str, Any]:
    deployments = {AGGREGATOR: deployment_entry(AGGREGATOR, spec.aggregator)}
    deployments |= {f.name: deployment_entry(f.name, f.deployment, f.dataset) for f in spec.facilities}
    port_bindings = [_port_binding(f) for f in spec.facilities if isinstance(f.deployment, SlurmDeployment)]
    step_bindings = [{"step": step, "target": {"deployment": deployment}} for step, deployment in bindings(spec)]
    return {
        "version": "v1.0",
        "workflows": {
            spec.name: {
                "type": "cwl",
                "config": {
                    "file": MAIN_CWL,
                    "settings": INPUTS_YML,
                    # The tools run on the bound target as they are; containers are the facility's business.
                    "docker": [{"step": "/", "deployment": {"type": "none", "config": {}}}],
                },
                "bindings": step_bindings + port_bindings,
            }
        },
        "deployments": deployments,
        "database": {"type": "default", "config": {"connection": DATABASE}},
        # A job that failed for a transient reason (a transfer, a lost connection) is run again; a
        # training that fails on its own is not a failure here (it leaves its facility out of the round).
        "failureManager": {
            "enabled": spec.recovery.retries > 0,
            "type": "default",
            "config": {"max_retries": spec.recovery.retries, "retry_delay": spec.recovery.retry_delay},
        },
    }
