"""inputs.yml: where the data lives and how many rounds to run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from xffl_cwl.contract.layout import dataset_input_id
from xffl_cwl.federation.spec import FederationSpec, SlurmDeployment

FILE_SUFFIXES = (".jsonl", ".json", ".txt", ".md")


def _location(path: str | Path) -> dict[str, str]:
    p = Path(path)
    kind = "Directory" if p.is_dir() or (not p.exists() and p.suffix == "") else "File"
    return {"class": kind, "path": str(path)}


def build_job_order(spec: FederationSpec) -> dict[str, Any]:
    """The workflow's inputs: the model, the test set, each facility's dataset, the rounds."""
    order: dict[str, Any] = {"model": _location(spec.model), "rounds": spec.rounds}
    if spec.test_set is not None:
        order["test_set"] = _location(spec.test_set)
    for facility in spec.facilities:
        if isinstance(facility.deployment, SlurmDeployment):
            # Relative to the port binding's workdir on the facility (see streamflow_config._port_binding).
            kind = "File" if Path(facility.dataset).suffix in FILE_SUFFIXES else "Directory"
            order[dataset_input_id(facility.name)] = {"class": kind, "path": Path(facility.dataset).name}
        else:
            order[dataset_input_id(facility.name)] = _location(facility.dataset)
    return order
