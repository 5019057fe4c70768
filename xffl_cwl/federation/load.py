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
    TrainingSettings,
)

# Facility names become CWL step ids (train_<name>), JavaScript-visible input names
# (dataset_<name>) and StreamFlow deployment names (^[a-z][a-zA-Z0-9._-]*$): the intersection.
FACILITY_NAME = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
FEDERATION_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
RESERVED_NAMES = frozenset({"aggregator"})
DEPLOYMENT_KINDS = ("local",)


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
    """`local` or a mapping with `kind`; workdirs are resolved against federation.yml's folder."""
    if isinstance(value, str):
        value = {"kind": value}
    section = _mapping(value, where, ("kind", "workdir", "gpus"), ("kind",))
    kind = _choice(section["kind"], where / "kind", DEPLOYMENT_KINDS)
    workdir = section.get("workdir")
    gpus = _int(section.get("gpus", 0), where / "gpus", 0)
    if kind == "local":
        return LocalDeployment(workdir=None if workdir is None else (base / _str(workdir, where / "workdir")).resolve(), gpus=gpus)
    raise where.fail(f"deployment kind {kind!r} is not handled")  # pragma: no cover - _choice guards


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
