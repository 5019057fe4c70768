"""The federation as typed objects. Everything here is already validated; nothing here reads files."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal


@dataclass(frozen=True)
class LoraSettings:
    r: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    dropout: float = 0.0


@dataclass(frozen=True)
class TrainingSettings:
    """What every facility's `xffl-cwl train` gets unless the facility overrides it."""

    mode: Literal["full", "lora"] = "full"
    local_steps: int | None = None
    epochs: float | None = None
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-4
    warmup_steps: int | None = None
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seq_len: int = 512
    seed: int = 0
    precision: Literal["fp32", "bf16"] = "fp32"
    eval_fraction: float = 0.1
    text_field: str = "text"
    lora: LoraSettings = field(default_factory=LoraSettings)

    def merged(self, overrides: dict[str, Any]) -> TrainingSettings:
        return replace(self, **overrides)


TRAINING_KEYS = tuple(f.name for f in fields(TrainingSettings))


@dataclass(frozen=True)
class AggregationSettings:
    strategy: Literal["fedavg", "fedavgm", "fedadam", "fedyogi", "nesterov"] = "fedavg"
    server_lr: float | None = None
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.99)
    tau: float = 1e-3
    min_updates: int = 1
    lora_merge: Literal["exact", "fedit"] = "exact"
    weighting: Literal["samples", "tokens", "uniform"] = "samples"


@dataclass(frozen=True)
class LocalDeployment:
    """Runs on the machine that runs StreamFlow, in its own working directory."""

    kind: Literal["local"] = "local"
    workdir: Path | None = None
    gpus: int = 0


@dataclass(frozen=True)
class SlurmDeployment:
    """An HPC facility: SSH to its login node, each step a SLURM job (the xffl-facility StreamFlow plugin)."""

    host: str
    username: str
    workdir: str
    port: int = 22
    ssh_key: Path | None = None
    known_hosts: Path | None = None
    check_host_key: bool = True
    template: str = "generic"
    sbatch: dict[str, Any] = field(default_factory=dict)  # streamflow.yml's keys: partition, gpusPerNode, ...
    container: dict[str, Any] = field(default_factory=dict)  # runtime, image, options, bind
    setup: tuple[str, ...] = ()
    max_concurrent_jobs: int = 4
    polling_interval: float = 5.0
    connect_timeout: int = 30
    retries: int = 3
    retry_delay: int = 5
    gpus: int = 0
    kind: Literal["slurm"] = "slurm"


Deployment = LocalDeployment | SlurmDeployment


@dataclass(frozen=True)
class FacilitySpec:
    name: str
    dataset: str
    deployment: Deployment
    training: TrainingSettings


@dataclass(frozen=True)
class FederationSpec:
    """A whole federation: `source` is the federation.yml it came from (paths are resolved against it)."""

    name: str
    rounds: int
    model: Path
    test_set: Path | None
    training: TrainingSettings
    aggregation: AggregationSettings
    aggregator: Deployment
    facilities: tuple[FacilitySpec, ...]
    source: Path | None = None
    eval_batch_size: int = 16

    def facility(self, name: str) -> FacilitySpec:
        return next(f for f in self.facilities if f.name == name)
