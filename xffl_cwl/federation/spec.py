"""The federation as typed objects. Everything here is already validated; nothing here reads files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from xffl_cwl.contract.facility import FacilityConfig
from xffl_cwl.contract.options import AggregateOptions, TrainOptions


@dataclass(frozen=True)
class LocalDeployment:
    """Runs on the machine that runs StreamFlow, in its own working directory."""

    kind: Literal["local"] = "local"
    workdir: Path | None = None  # None: work/<name> inside the run folder
    gpus: int = 0
    workers: int | None = None  # training processes; None: one per GPU, else 1


@dataclass(frozen=True)
class SlurmDeployment:
    """An HPC facility: SSH to its login node, each step a SLURM job (the xffl-facility StreamFlow plugin)."""

    facility: FacilityConfig
    workdir: str  # absolute, on the facility
    kind: Literal["slurm"] = "slurm"


Deployment = LocalDeployment | SlurmDeployment


@dataclass(frozen=True)
class FacilitySpec:
    name: str
    dataset: str  # absolute: local paths resolved against federation.yml, SLURM paths on the facility
    deployment: Deployment
    training: TrainOptions
    weight: float | None = None  # fixed relative weight in aggregation (set for all facilities or none)
    deadline: int | None = None  # seconds from a train job's submission to its end (round_deadline)


@dataclass(frozen=True)
class Recovery:
    """How often StreamFlow retries a job that failed for a transient reason (a transfer, a lost connection)."""

    retries: int = 2
    retry_delay: int = 5


@dataclass(frozen=True)
class FederationSpec:
    """A whole federation: `source` is the federation.yml it came from (paths are resolved against it)."""

    name: str
    rounds: int
    model: Path
    test_set: Path | None
    training: TrainOptions
    aggregation: AggregateOptions
    aggregator: LocalDeployment
    facilities: tuple[FacilitySpec, ...]
    source: Path | None = None
    eval_batch_size: int = 16
    round_deadline: int | None = None
    recovery: Recovery = Recovery()
