"""streamflow.yml: one deployment per facility plus the aggregator's, and a binding for every step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ruamel.yaml.scalarstring import DoubleQuotedScalarString

from xffl_cwl.federation.spec import Deployment, FacilitySpec, FederationSpec, LocalDeployment, SlurmDeployment
from xffl_cwl.generator.workflows import dataset_input_id, train_step_id

AGGREGATOR = "aggregator"
DATABASE = ".streamflow/sqlite.db"


def workdir_of(name: str, deployment: Deployment) -> str:
    """Local workdirs default to work/<name> inside the run folder (relative, so the folder can move)."""
    if isinstance(deployment, LocalDeployment) and deployment.workdir is None:
        return f"work/{name}"
    return str(deployment.workdir)


def custom_template_path(name: str) -> str:
    """Where a facility's own SLURM template is copied inside the run folder."""
    return f"slurm/{name}.sh"


def is_template_file(template: str) -> bool:
    return template.startswith("/")


def _facility_config(name: str, d: SlurmDeployment, dataset: str | None) -> dict[str, Any]:
    config: dict[str, Any] = {"host": d.host, "port": d.port, "username": d.username}
    if d.ssh_key is not None:
        config["sshKey"] = str(d.ssh_key)
    if d.known_hosts is not None:
        config["knownHosts"] = str(d.known_hosts)
    if not d.check_host_key:
        config["checkHostKey"] = False
    config["template"] = custom_template_path(name) if is_template_file(d.template) else d.template
    if d.sbatch:
        config["sbatch"] = dict(d.sbatch)
        if "time" in d.sbatch:
            config["sbatch"]["time"] = DoubleQuotedScalarString(d.sbatch["time"])  # 00:10:00 is a number to YAML 1.1
    container = dict(d.container)
    if container.get("runtime") != "none":
        # The container must see the staged inputs (under the workdir) and the dataset, which stays in place.
        binds = [d.workdir] + ([str(Path(dataset).parent)] if dataset else [])
        container["bind"] = list(dict.fromkeys(container.get("bind", []) + binds))
    if container:
        config["container"] = container
    if d.setup:
        config["setup"] = list(d.setup)
    config |= {"maxConcurrentJobs": d.max_concurrent_jobs, "pollingInterval": d.polling_interval}
    for key, value, default in (("connectTimeout", d.connect_timeout, 30), ("retries", d.retries, 3), ("retryDelay", d.retry_delay, 5)):
        if value != default:
            config[key] = value
    return config


def deployment_entry(name: str, deployment: Deployment, dataset: str | None = None) -> dict[str, Any]:
    if isinstance(deployment, SlurmDeployment):
        return {"type": "xffl-facility", "config": _facility_config(name, deployment, dataset), "workdir": deployment.workdir}
    return {"type": "local", "config": {}, "workdir": workdir_of(name, deployment)}


def _port_binding(facility: FacilitySpec) -> dict[str, Any]:
    """The dataset already lives on the facility: StreamFlow must not look for it here, nor copy it."""
    return {"port": f"/{dataset_input_id(facility.name)}", "target": {"deployment": facility.name, "workdir": str(Path(facility.dataset).parent)}}


def bindings(spec: FederationSpec) -> list[tuple[str, str]]:
    """(step path, deployment) pairs, in the order they appear in the workflow."""
    pairs = [("/baseline", AGGREGATOR)]
    pairs += [(f"/federation/{train_step_id(f.name)}", f.name) for f in spec.facilities]
    pairs += [("/federation/aggregate", AGGREGATOR), ("/federation/evaluate", AGGREGATOR)]
    return pairs


def build_streamflow_config(spec: FederationSpec) -> dict[str, Any]:
    deployments = {AGGREGATOR: deployment_entry(AGGREGATOR, spec.aggregator)}
    deployments |= {f.name: deployment_entry(f.name, f.deployment, f.dataset) for f in spec.facilities}
    port_bindings = [_port_binding(f) for f in spec.facilities if isinstance(f.deployment, SlurmDeployment)]
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
                "bindings": [{"step": step, "target": {"deployment": deployment}} for step, deployment in bindings(spec)] + port_bindings,
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
        if isinstance(facility.deployment, SlurmDeployment):
            # Relative to the port binding's workdir on the facility (see _port_binding).
            suffix = Path(facility.dataset).suffix
            kind = "File" if suffix in (".jsonl", ".json", ".txt", ".md") else "Directory"
            order[dataset_input_id(facility.name)] = {"class": kind, "path": Path(facility.dataset).name}
        else:
            order[dataset_input_id(facility.name)] = location(facility.dataset)
    return order
