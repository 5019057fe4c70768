"""Parse federation.yml strictly: every mistake is one line naming the key and the fix."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from xffl_cwl.errors import InputError
from xffl_cwl.federation.spec import (
    TRAINING_KEYS,
    AggregationSettings,
    Deployment,
    FacilitySpec,
    FederationSpec,
    LocalDeployment,
    LoraSettings,
    SlurmDeployment,
    TrainingSettings,
)
from xffl_cwl.slurm_templates import TemplateError, default_gpus, load_template

# Facility names become CWL step ids (train_<name>), JavaScript-visible input names
# (dataset_<name>) and StreamFlow deployment names (^[a-z][a-zA-Z0-9._-]*$): the intersection.
FACILITY_NAME = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
FEDERATION_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
RESERVED_NAMES = frozenset({"aggregator"})
DEPLOYMENT_KINDS = ("local", "slurm")


class _Where:
    """A key path such as `facilities[1].training.lr`, for error messages."""

    def __init__(self, source: str, path: str = "") -> None:
        self.source, self.path = source, path

    def __truediv__(self, key: str | int) -> _Where:
        if isinstance(key, int):
            return _Where(self.source, f"{self.path}[{key}]")
        return _Where(self.source, f"{self.path}.{key}" if self.path else key)

    def fail(self, problem: str) -> InputError:
        return InputError(f"{self.source}: {self.path or 'top level'}: {problem}")


def _mapping(value: Any, where: _Where, allowed: tuple[str, ...], required: tuple[str, ...] = ()) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise where.fail(f"must be a mapping of keys ({', '.join(allowed)}), got {type(value).__name__}")
    for key in value:
        if key not in allowed:
            raise (where / str(key)).fail(f"unknown key; expected one of {', '.join(allowed)}")
    for key in required:
        if key not in value or value[key] is None:
            raise (where / key).fail("is required")
    return value


def _int(value: Any, where: _Where, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise where.fail(f"must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise where.fail(f"must be at least {minimum}, got {value}")
    return value


def _float(value: Any, where: _Where, positive: bool = False, low: float | None = None, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise where.fail(f"must be a number, got {value!r}")
    if positive and value <= 0:
        raise where.fail(f"must be positive, got {value}")
    if (low is not None and value < low) or (high is not None and value >= high):
        raise where.fail(f"must be in [{low}, {high}), got {value}")
    return float(value)


def _choice(value: Any, where: _Where, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise where.fail(f"must be one of {', '.join(choices)}, got {value!r}")
    return value


def _str(value: Any, where: _Where) -> str:
    if not isinstance(value, str) or not value:
        raise where.fail(f"must be a non-empty string, got {value!r}")
    return value


def _existing_path(value: Any, where: _Where, base: Path, what: str) -> Path:
    path = (base / _str(value, where)).resolve()
    if not path.exists():
        raise where.fail(f"{path} does not exist; point it at {what}")
    return path


LORA_FIELDS: dict[str, Callable[[Any, _Where], Any]] = {
    "r": lambda v, w: _int(v, w, 1),
    "alpha": lambda v, w: _float(v, w, positive=True),
    "targets": lambda v, w: _targets(v, w),
    "dropout": lambda v, w: _float(v, w, low=0.0, high=1.0),
}


def _targets(value: Any, where: _Where) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [t.strip() for t in value.split(",")]
    if not isinstance(value, list) or not value or not all(isinstance(t, str) and re.fullmatch(r"[A-Za-z0-9_.]+", t) for t in value):
        raise where.fail("must be a list of module names such as [q_proj, v_proj]")
    return tuple(value)


def _optional(check: Callable[[Any, _Where], Any]) -> Callable[[Any, _Where], Any]:
    return lambda v, w: None if v is None else check(v, w)


TRAINING_FIELDS: dict[str, Callable[[Any, _Where], Any]] = {
    "mode": lambda v, w: _choice(v, w, ("full", "lora")),
    "local_steps": _optional(lambda v, w: _int(v, w, 1)),
    "epochs": _optional(lambda v, w: _float(v, w, positive=True)),
    "batch_size": lambda v, w: _int(v, w, 1),
    "grad_accum": lambda v, w: _int(v, w, 1),
    "lr": lambda v, w: _float(v, w, positive=True),
    "warmup_steps": _optional(lambda v, w: _int(v, w, 0)),
    "weight_decay": lambda v, w: _float(v, w, low=0.0, high=1.0),
    "max_grad_norm": lambda v, w: _float(v, w, positive=True),
    "seq_len": lambda v, w: _int(v, w, 2),
    "seed": lambda v, w: _int(v, w, 0),
    "precision": lambda v, w: _choice(v, w, ("fp32", "bf16")),
    "eval_fraction": lambda v, w: _float(v, w, low=0.0, high=1.0),
    "text_field": _str,
}
assert set(TRAINING_FIELDS) | {"lora"} == set(TRAINING_KEYS)


def _training(value: Any, where: _Where, base: TrainingSettings) -> TrainingSettings:
    """Settings over `base`: the federation's defaults, or for a facility the federation's settings."""
    section = _mapping(value or {}, where, TRAINING_KEYS)
    changes = {key: TRAINING_FIELDS[key](section[key], where / key) for key in section if key != "lora"}
    if "lora" in section:
        lora = _mapping(section["lora"] or {}, where / "lora", tuple(LORA_FIELDS))
        lora_changes = {k: LORA_FIELDS[k](lora[k], where / "lora" / k) for k in lora}
        changes["lora"] = LoraSettings(**{**base.lora.__dict__, **lora_changes})
    settings = base.merged(changes)
    if settings.local_steps is not None and settings.epochs is not None and ("local_steps" in section or "epochs" in section):
        if "local_steps" in section and "epochs" in section:
            raise where.fail("give local_steps or epochs, not both")
        # A facility that sets one of them replaces the federation's choice of the other.
        settings = settings.merged({"epochs": None} if "local_steps" in section else {"local_steps": None})
    return settings


AGGREGATION_FIELDS: dict[str, Callable[[Any, _Where], Any]] = {
    "strategy": lambda v, w: _choice(v, w, ("fedavg", "fedavgm", "fedadam", "fedyogi", "nesterov")),
    "server_lr": _optional(lambda v, w: _float(v, w, positive=True)),
    "momentum": lambda v, w: _float(v, w, low=0.0, high=1.0),
    "betas": lambda v, w: _betas(v, w),
    "tau": lambda v, w: _float(v, w, positive=True),
    "min_updates": lambda v, w: _int(v, w, 1),
    "lora_merge": lambda v, w: _choice(v, w, ("exact", "fedit")),
    "weighting": lambda v, w: _choice(v, w, ("samples", "tokens", "uniform")),
}


def _betas(value: Any, where: _Where) -> tuple[float, float]:
    if not isinstance(value, list) or len(value) != 2:
        raise where.fail("must be two numbers such as [0.9, 0.99]")
    return (_float(value[0], where / 0, low=0.0, high=1.0), _float(value[1], where / 1, low=0.0, high=1.0))


def _aggregation(value: Any, where: _Where) -> AggregationSettings:
    section = _mapping(value or {}, where, tuple(AGGREGATION_FIELDS))
    return AggregationSettings(**{k: AGGREGATION_FIELDS[k](section[k], where / k) for k in section})


def _deployment(value: Any, where: _Where, base: Path) -> Deployment:
    """`local`, or a mapping with `kind` (local or slurm); local paths are resolved against federation.yml's folder."""
    if isinstance(value, str):
        value = {"kind": value}
    if not isinstance(value, Mapping) or "kind" not in value:
        raise where.fail("must be `local` or a mapping with kind: local or kind: slurm")
    kind = _choice(value["kind"], where / "kind", DEPLOYMENT_KINDS)
    if kind == "slurm":
        return _slurm(value, where, base)
    section = _mapping(value, where, ("kind", "workdir", "gpus"), ("kind",))
    workdir = section.get("workdir")
    gpus = _int(section.get("gpus", 0), where / "gpus", 0)
    return LocalDeployment(workdir=None if workdir is None else (base / _str(workdir, where / "workdir")).resolve(), gpus=gpus)


SLURM_KEYS = (
    "kind", "host", "port", "username", "ssh_key", "known_hosts", "check_host_key", "template", "sbatch", "container",
    "setup", "workdir", "max_concurrent_jobs", "polling_interval", "connect_timeout", "retries", "retry_delay",
)
SBATCH_KEYS: dict[str, tuple[str, Callable[[Any, _Where], Any]]] = {
    "account": ("account", _str),
    "partition": ("partition", _str),
    "qos": ("qos", _str),
    "time": ("time", lambda v, w: _time(v, w)),
    "nodes": ("nodes", lambda v, w: _int(v, w, 1)),
    "gpus_per_node": ("gpusPerNode", lambda v, w: _int(v, w, 0)),
    "cpus_per_task": ("cpusPerTask", lambda v, w: _int(v, w, 1)),
    "mem": ("mem", _str),
    "constraint": ("constraint", _str),
    "reservation": ("reservation", _str),
    "job_name": ("jobName", _str),
    "extra": ("extra", lambda v, w: _flags(v, w)),
}


def _time(value: Any, where: _Where) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[0-9:-]+", value):
        raise where.fail(f"must be a SLURM time such as \"01:30:00\" (quote it in YAML), got {value!r}")
    return value


def _flags(value: Any, where: _Where) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v.startswith("--") for v in value):
        raise where.fail("must be a list of sbatch flags such as [\"--exclusive\"]")
    return list(value)


def _strings(value: Any, where: _Where) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise where.fail("must be a list of strings")
    return list(value)


def _local_file(value: Any, where: _Where, base: Path, what: str) -> Path:
    path = (base / Path(_str(value, where)).expanduser()).resolve()
    if not path.is_file():
        raise where.fail(f"{path} does not exist; point it at {what}")
    return path


def _slurm(value: Mapping[str, Any], where: _Where, base: Path) -> SlurmDeployment:
    section = _mapping(value, where, SLURM_KEYS, ("kind", "host", "username", "workdir"))
    template = _str(section.get("template", "generic"), where / "template")
    try:
        text = load_template(template, base)
    except TemplateError as exc:
        raise (where / "template").fail(str(exc)) from exc
    if "/" in template or template.endswith((".sh", ".j2", ".jinja2")):
        template = str((base / Path(template).expanduser()).resolve())
    sbatch_raw = _mapping(section.get("sbatch") or {}, where / "sbatch", tuple(SBATCH_KEYS))
    sbatch = {SBATCH_KEYS[k][0]: SBATCH_KEYS[k][1](v, where / "sbatch" / k) for k, v in sbatch_raw.items()}
    container_raw = _mapping(section.get("container") or {}, where / "container", ("runtime", "image", "options", "bind"))
    container: dict[str, Any] = {}
    if "runtime" in container_raw:
        container["runtime"] = _choice(container_raw["runtime"], where / "container" / "runtime", ("apptainer", "singularity", "none"))
    if "image" in container_raw:
        container["image"] = _str(container_raw["image"], where / "container" / "image")
    for key in ("options", "bind"):
        if key in container_raw:
            container[key] = _strings(container_raw[key], where / "container" / key)
    workdir = _str(section["workdir"], where / "workdir")
    if not workdir.startswith("/"):
        raise (where / "workdir").fail(f"must be an absolute path on the facility, got {workdir!r}")
    gpus, nvidia = default_gpus(text)
    return SlurmDeployment(
        host=_str(section["host"], where / "host"),
        username=_str(section["username"], where / "username"),
        workdir=workdir,
        port=_int(section.get("port", 22), where / "port", 1),
        ssh_key=None if section.get("ssh_key") is None else _local_file(section["ssh_key"], where / "ssh_key", base, "your private SSH key"),
        known_hosts=None if section.get("known_hosts") is None else _local_file(section["known_hosts"], where / "known_hosts", base, "a known_hosts file with the login node's key"),
        check_host_key=_bool(section.get("check_host_key", True), where / "check_host_key"),
        template=template,
        sbatch=sbatch,
        container=container,
        setup=tuple(_strings(section.get("setup") or [], where / "setup")),
        max_concurrent_jobs=_int(section.get("max_concurrent_jobs", 4), where / "max_concurrent_jobs", 1),
        polling_interval=_float(section.get("polling_interval", 5), where / "polling_interval", positive=True),
        connect_timeout=_int(section.get("connect_timeout", 30), where / "connect_timeout", 1),
        retries=_int(section.get("retries", 3), where / "retries", 1),
        retry_delay=_int(section.get("retry_delay", 5), where / "retry_delay", 0),
        gpus=sbatch.get("gpusPerNode", gpus) if nvidia else 0,
    )


def _bool(value: Any, where: _Where) -> bool:
    if not isinstance(value, bool):
        raise where.fail(f"must be true or false, got {value!r}")
    return value


def _facility(value: Any, where: _Where, base: Path, training: TrainingSettings) -> FacilitySpec:
    section = _mapping(value, where, ("name", "dataset", "deployment", "training"), ("name", "dataset"))
    name = _str(section["name"], where / "name")
    if not FACILITY_NAME.fullmatch(name):
        raise (where / "name").fail(
            f"{name!r} is not a safe facility name; use lowercase letters, digits and _, starting with a letter (it becomes a CWL step id and a StreamFlow deployment)"
        )
    if name in RESERVED_NAMES:
        raise (where / "name").fail(f"{name!r} is reserved for the aggregator's deployment; rename the facility")
    deployment = _deployment(section.get("deployment", "local"), where / "deployment", base)
    dataset = _str(section["dataset"], where / "dataset")
    if isinstance(deployment, LocalDeployment):
        dataset = str(_existing_path(dataset, where / "dataset", base, "this facility's dataset"))
    elif not dataset.startswith("/"):
        raise (where / "dataset").fail(f"must be an absolute path on the facility, got {dataset!r}")
    return FacilitySpec(name, dataset, deployment, _training(section.get("training"), where / "training", training))


TOP_KEYS = ("name", "rounds", "model", "test_set", "training", "aggregation", "aggregator", "facilities", "eval_batch_size")


def parse_federation(data: Any, source: Path) -> FederationSpec:
    """Validate an already-loaded federation.yml document; `source` locates relative paths."""
    where = _Where(source.name)
    base = source.parent.resolve()
    top = _mapping(data, where, TOP_KEYS, ("name", "rounds", "model", "facilities"))
    name = _str(top["name"], where / "name")
    if not FEDERATION_NAME.fullmatch(name):
        raise (where / "name").fail(f"{name!r} is not a safe name; use lowercase letters, digits, _ and -, starting with a letter")
    rounds = _int(top["rounds"], where / "rounds", 1)
    model = _existing_path(top["model"], where / "model", base, "a Hugging Face model directory")
    if not model.is_dir():
        raise (where / "model").fail(f"{model} is not a directory; point it at a Hugging Face model directory")
    test_set = None if top.get("test_set") is None else _existing_path(top["test_set"], where / "test_set", base, "a held-out dataset")
    training = _training(top.get("training"), where / "training", TrainingSettings())
    if training.local_steps is None and training.epochs is None:
        training = training.merged({"local_steps": 100})
    aggregation = _aggregation(top.get("aggregation"), where / "aggregation")
    aggregator = _deployment(top.get("aggregator", "local"), where / "aggregator", base)
    if not isinstance(aggregator, LocalDeployment):
        raise (where / "aggregator").fail("the aggregator runs where StreamFlow runs: use local (the model and test set are read there)")
    facilities_raw = top["facilities"]
    if not isinstance(facilities_raw, list) or not facilities_raw:
        raise (where / "facilities").fail("must be a non-empty list of facilities")
    facilities = []
    for i, raw in enumerate(facilities_raw):
        facility = _facility(raw, where / "facilities" / i, base, training)
        if any(f.name == facility.name for f in facilities):
            raise (where / "facilities" / i / "name").fail(f"duplicate facility {facility.name!r}; every facility needs its own name")
        facilities.append(facility)
    if aggregation.min_updates > len(facilities):
        raise (where / "aggregation" / "min_updates").fail(f"is {aggregation.min_updates} but there are only {len(facilities)} facilities")
    eval_batch = _int(top.get("eval_batch_size", 16), where / "eval_batch_size", 1)
    return FederationSpec(name, rounds, model, test_set, training, aggregation, aggregator, tuple(facilities), source.resolve(), eval_batch)


def load_federation(path: Path) -> FederationSpec:
    """Read and validate federation.yml."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        data = YAML(typ="safe", pure=True).load(text)
    except YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise InputError(f"{path.name}:{at} is not valid YAML ({problem})") from exc
    return parse_federation(data, path)
