"""Parse federation.yml strictly: every mistake is one line naming the key and the fix."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from xffl_cwl.contract.facility import (
    CONTAINER_RUNTIMES,
    SAFE_PATH,
    ContainerSettings,
    FacilityConfig,
    SbatchOptions,
    control_character,
    facility_problems,
)
from xffl_cwl.contract.layout import AGGREGATOR
from xffl_cwl.contract.options import AggregateOptions, LoraOptions, TrainOptions
from xffl_cwl.contract.params import Param, ParamError, params, shown
from xffl_cwl.errors import InputError
from xffl_cwl.facility.templates import TemplateError, effective_runtime, is_template_file, load_template
from xffl_cwl.federation.spec import (
    Deployment,
    FacilitySpec,
    FederationSpec,
    LocalDeployment,
    Recovery,
    SlurmDeployment,
)

# Facility names become CWL step ids (train_<name>), JavaScript-visible input names
# (dataset_<name>) and StreamFlow deployment names (^[a-z][a-zA-Z0-9._-]*$): the intersection.
FACILITY_NAME = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
FEDERATION_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
RESERVED_NAMES = frozenset({AGGREGATOR})
DEPLOYMENT_KINDS = ("local", "slurm")
DEFAULT_LOCAL_STEPS = 100  # a federation that names neither local_steps nor epochs


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
            raise (where / shown(key, 40).strip("'")).fail(f"unknown key; expected one of {', '.join(allowed)}")
    for key in required:
        if key not in value or value[key] is None:
            raise (where / key).fail("is required")
    return value


def _setting(p: Param, value: Any, where: _Where) -> Any:
    try:
        return p.check(value)
    except ParamError as exc:
        raise where.fail(str(exc)) from None


def _int(value: Any, where: _Where, minimum: int) -> int:
    return _setting(Param("", "int", None, "", minimum=minimum), value, where)


def _float(value: Any, where: _Where, positive: bool = False) -> float:
    return _setting(Param("", "float", None, "", minimum=0 if positive else None, min_exclusive=positive), value, where)


def _str(value: Any, where: _Where) -> str:
    return _setting(Param("", "str", None, ""), value, where)


def _bool(value: Any, where: _Where) -> bool:
    return _setting(Param("", "bool", None, ""), value, where)


def _choice(value: Any, where: _Where, choices: tuple[str, ...]) -> str:
    return _setting(Param("", "choice", None, "", choices=choices), value, where)


def _strings(value: Any, where: _Where) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise where.fail("must be a list of strings")
    for i, v in enumerate(value):
        if bad := control_character(v):
            raise (where / i).fail(f"holds the control character {bad}; write it on one line without it")
    return tuple(value)


def _existing_path(value: Any, where: _Where, base: Path, what: str) -> Path:
    path = (base / _str(value, where)).resolve()
    if not path.exists():
        raise where.fail(f"{path} does not exist; point it at {what}")
    return path


def _settings_section(cls: type, value: Any, where: _Where, nested: tuple[str, ...] = ()) -> dict[str, Any]:
    """The keys of a settings section, each checked against its Param."""
    table = {p.name: p for p in params(cls)}
    section = _mapping(value or {}, where, (*table, *nested))
    return {key: _setting(table[key], section[key], where / key) for key in section if key in table}


def _training(value: Any, where: _Where, base: TrainOptions) -> TrainOptions:
    """Settings over `base`: the federation's defaults, or for a facility the federation's settings."""
    changes = _settings_section(TrainOptions, value, where, ("lora",))
    section = value or {}
    if "lora" in section:
        lora = _settings_section(LoraOptions, section["lora"], where / "lora")
        changes["lora"] = LoraOptions(**{**{f.name: getattr(base.lora, f.name) for f in fields(LoraOptions)}, **lora})
    if "local_steps" in changes and "epochs" in changes and None not in (changes["local_steps"], changes["epochs"]):
        raise where.fail("give local_steps or epochs, not both")
    # A section that sets one of them replaces the federation's choice of the other.
    if changes.get("local_steps") is not None:
        changes["epochs"] = None
    elif changes.get("epochs") is not None:
        changes["local_steps"] = None
    return base.merged(changes)


def _aggregation(value: Any, where: _Where) -> AggregateOptions:
    return AggregateOptions(**_settings_section(AggregateOptions, value, where))


def _deployment(value: Any, where: _Where, base: Path) -> Deployment:
    """`local`, or a mapping with `kind` (local or slurm); local paths are resolved against federation.yml's folder."""
    if isinstance(value, str):
        value = {"kind": value}
    if not isinstance(value, Mapping) or "kind" not in value:
        raise where.fail("must be `local` or a mapping with kind: local or kind: slurm")
    kind = _choice(value["kind"], where / "kind", DEPLOYMENT_KINDS)
    if kind == "slurm":
        return _slurm(value, where, base)
    section = _mapping(value, where, ("kind", "workdir", "gpus", "workers"), ("kind",))
    workdir = section.get("workdir")
    gpus = _int(section.get("gpus", 0), where / "gpus", 0)
    workers = section.get("workers")
    return LocalDeployment(
        workdir=None if workdir is None else (base / _str(workdir, where / "workdir")).resolve(),
        gpus=gpus,
        workers=None if workers is None else _int(workers, where / "workers", 1),
    )


SLURM_KEYS = (
    "kind", "host", "port", "username", "ssh_key", "known_hosts", "check_host_key", "template", "sbatch", "container",
    "setup", "workdir", "max_concurrent_jobs", "polling_interval", "connect_timeout", "retries", "retry_delay",
    "unreachable_timeout",
)  # fmt: skip


def _time(value: Any, where: _Where) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[0-9:-]+", value):
        raise where.fail(f'must be a SLURM time such as "01:30:00" (quote it in YAML), got {shown(value)}')
    return value


def _flags(value: Any, where: _Where) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v.startswith("--") for v in value):
        raise where.fail('must be a list of sbatch flags such as ["--exclusive"]')
    return tuple(value)


SBATCH_CHECKS: dict[str, Callable[[Any, _Where], Any]] = {
    "account": _str,
    "partition": _str,
    "qos": _str,
    "time": _time,
    "nodes": lambda v, w: _int(v, w, 1),
    "gpus_per_node": lambda v, w: _int(v, w, 0),
    "ntasks_per_node": lambda v, w: _int(v, w, 1),
    "cpus_per_task": lambda v, w: _int(v, w, 1),
    "mem": _str,
    "constraint": _str,
    "reservation": _str,
    "job_name": _str,
    "extra": _flags,
}
assert set(SBATCH_CHECKS) == {f.name for f in fields(SbatchOptions)}


def _duration(value: Any, where: _Where) -> int:
    """Seconds, given as a number of seconds or as SLURM writes times: [D-]HH:MM:SS, MM:SS."""
    if isinstance(value, str):
        days, _, clock = value.rpartition("-") if "-" in value else ("0", "", value)
        parts = clock.split(":")
        if days.isdigit() and 1 <= len(parts) <= 3 and all(p.isdigit() for p in parts):
            seconds = 0
            for part in parts:
                seconds = seconds * 60 + int(part)
            value = int(days) * 86400 + seconds
    seconds = _int(value, where, 1)
    return seconds


def _local_file(value: Any, where: _Where, base: Path, what: str) -> str:
    path = (base / Path(_str(value, where)).expanduser()).resolve()
    if not path.is_file():
        raise where.fail(f"{path} does not exist; point it at {what}")
    return str(path)


def _container(value: Any, where: _Where) -> ContainerSettings:
    raw = _mapping(value or {}, where, ("runtime", "image", "options", "bind"))
    return ContainerSettings(
        runtime=None if "runtime" not in raw else _choice(raw["runtime"], where / "runtime", CONTAINER_RUNTIMES),
        image=None if "image" not in raw else _str(raw["image"], where / "image"),
        options=None if "options" not in raw else _strings(raw["options"], where / "options"),
        bind=() if "bind" not in raw else _strings(raw["bind"], where / "bind"),
    )


def _slurm(value: Mapping[str, Any], where: _Where, base: Path) -> SlurmDeployment:
    section = _mapping(value, where, SLURM_KEYS, ("kind", "host", "username", "workdir"))
    template = _str(section.get("template", "generic"), where / "template")
    try:
        loaded = load_template(template, base)
    except TemplateError as exc:
        raise (where / "template").fail(str(exc)) from exc
    container = _container(section.get("container"), where / "container")
    runtime = effective_runtime(loaded, container)
    if runtime != "none" and not container.image:
        raise (where / "container" / "image").fail(
            f"jobs run in {runtime} (template {template}) but no image is set; give the image "
            f"({'its name, e.g. localhost/xffl-cwl:0.1.0' if runtime == 'podman' else 'the .sif path on the facility'}), "
            "or set container.runtime: none"
        )
    if is_template_file(template):
        template = str((base / Path(template).expanduser()).resolve())
    sbatch_raw = _mapping(section.get("sbatch") or {}, where / "sbatch", tuple(SBATCH_CHECKS))
    sbatch = SbatchOptions(**{k: SBATCH_CHECKS[k](v, where / "sbatch" / k) for k, v in sbatch_raw.items()})
    workdir = _str(section["workdir"], where / "workdir")
    if not workdir.startswith("/"):
        raise (where / "workdir").fail(f"must be an absolute path on the facility, got {shown(workdir)}")
    defaults = FacilityConfig(host="", username="")
    ssh_key, known_hosts = section.get("ssh_key"), section.get("known_hosts")
    facility = FacilityConfig(
        host=_str(section["host"], where / "host"),
        port=_int(section.get("port", defaults.port), where / "port", 1),
        username=_str(section["username"], where / "username"),
        ssh_key=None if ssh_key is None else _local_file(ssh_key, where / "ssh_key", base, "your private SSH key"),
        known_hosts=None
        if known_hosts is None
        else _local_file(known_hosts, where / "known_hosts", base, "a known_hosts file with the login node's key"),
        check_host_key=_bool(section.get("check_host_key", defaults.check_host_key), where / "check_host_key"),
        template=template,
        sbatch=sbatch,
        container=container,
        setup=_strings(section.get("setup") or [], where / "setup"),
        max_concurrent_jobs=_int(
            section.get("max_concurrent_jobs", defaults.max_concurrent_jobs), where / "max_concurrent_jobs", 1
        ),
        polling_interval=_float(
            section.get("polling_interval", defaults.polling_interval), where / "polling_interval", positive=True
        ),
        connect_timeout=_int(section.get("connect_timeout", defaults.connect_timeout), where / "connect_timeout", 1),
        retries=_int(section.get("retries", defaults.retries), where / "retries", 1),
        retry_delay=_int(section.get("retry_delay", defaults.retry_delay), where / "retry_delay", 0),
        unreachable_timeout=_int(
            section.get("unreachable_timeout", defaults.unreachable_timeout), where / "unreachable_timeout", 1
        ),
    )
    for key, problem in facility_problems(facility, workdir):
        raise _Where(where.source, f"{where.path}.{key}").fail(problem)
    return SlurmDeployment(facility, workdir)


def _facility(value: Any, where: _Where, base: Path, training: TrainOptions, deadline: int | None) -> FacilitySpec:
    keys = ("name", "dataset", "deployment", "training", "weight", "round_deadline")
    section = _mapping(value, where, keys, ("name", "dataset"))
    name = _str(section["name"], where / "name")
    if not FACILITY_NAME.fullmatch(name):
        raise (where / "name").fail(
            f"{shown(name)} is not a safe facility name; use lowercase letters, digits and _, starting with a letter "
            "(it becomes a CWL step id and a StreamFlow deployment)"
        )
    if name in RESERVED_NAMES:
        raise (where / "name").fail(f"{name!r} is reserved for the aggregator's deployment; rename the facility")
    deployment = _deployment(section.get("deployment", "local"), where / "deployment", base)
    dataset = _str(section["dataset"], where / "dataset")
    if isinstance(deployment, LocalDeployment):
        dataset = str(_existing_path(dataset, where / "dataset", base, "this facility's dataset"))
    elif not SAFE_PATH.fullmatch(dataset):
        raise (where / "dataset").fail(
            f"must be an absolute path on the facility of letters, digits and _ . , + = @ % / -, got {shown(dataset)}"
        )
    weight = None if section.get("weight") is None else _float(section["weight"], where / "weight", positive=True)
    if section.get("round_deadline") is not None:
        deadline = _duration(section["round_deadline"], where / "round_deadline")
    return FacilitySpec(
        name, dataset, deployment, _training(section.get("training"), where / "training", training), weight, deadline
    )


TOP_KEYS = (
    "name",
    "rounds",
    "model",
    "test_set",
    "training",
    "aggregation",
    "aggregator",
    "facilities",
    "eval_batch_size",
    "round_deadline",
    "recovery",
)


def parse_federation(data: Any, source: Path) -> FederationSpec:
    """Validate an already-loaded federation.yml document; `source` locates relative paths."""
    where = _Where(source.name)
    base = source.parent.resolve()
    top = _mapping(data, where, TOP_KEYS, ("name", "rounds", "model", "facilities"))
    name = _str(top["name"], where / "name")
    if not FEDERATION_NAME.fullmatch(name):
        raise (where / "name").fail(
            f"{shown(name)} is not a safe name; use lowercase letters, digits, _ and -, starting with a letter"
        )
    rounds = _int(top["rounds"], where / "rounds", 1)
    model = _existing_path(top["model"], where / "model", base, "a Hugging Face model directory")
    if not model.is_dir():
        raise (where / "model").fail(f"{model} is not a directory; point it at a Hugging Face model directory")
    test_set = (
        None
        if top.get("test_set") is None
        else _existing_path(top["test_set"], where / "test_set", base, "a held-out dataset")
    )
    training = _training(top.get("training"), where / "training", TrainOptions())
    if training.local_steps is None and training.epochs is None:
        training = training.merged({"local_steps": DEFAULT_LOCAL_STEPS})
    aggregation = _aggregation(top.get("aggregation"), where / "aggregation")
    aggregator = _deployment(top.get("aggregator", "local"), where / "aggregator", base)
    if not isinstance(aggregator, LocalDeployment):
        raise (where / "aggregator").fail(
            "the aggregator runs where StreamFlow runs: use local (the model and test set are read there)"
        )
    deadline_raw = top.get("round_deadline")
    round_deadline = None if deadline_raw is None else _duration(deadline_raw, where / "round_deadline")
    recovery_raw = _mapping(top.get("recovery") or {}, where / "recovery", ("retries", "retry_delay"))
    recovery = Recovery(
        retries=_int(recovery_raw.get("retries", Recovery.retries), where / "recovery" / "retries", 0),
        retry_delay=_int(recovery_raw.get("retry_delay", Recovery.retry_delay), where / "recovery" / "retry_delay", 0),
    )
    facilities_raw = top["facilities"]
    if not isinstance(facilities_raw, list) or not facilities_raw:
        raise (where / "facilities").fail("must be a non-empty list of facilities")
    facilities: list[FacilitySpec] = []
    for i, raw in enumerate(facilities_raw):
        facility = _facility(raw, where / "facilities" / i, base, training, round_deadline)
        if any(f.name == facility.name for f in facilities):
            raise (where / "facilities" / i / "name").fail(
                f"duplicate facility {facility.name!r}; every facility needs its own name"
            )
        facilities.append(facility)
    weighted = [f.name for f in facilities if f.weight is not None]
    if weighted and len(weighted) != len(facilities):
        missing = next(i for i, f in enumerate(facilities) if f.weight is None)
        raise (where / "facilities" / missing / "weight").fail(
            f"is missing: {', '.join(weighted)} set a weight, so every facility needs one (or remove them all)"
        )
    if aggregation.min_updates > len(facilities):
        raise (where / "aggregation" / "min_updates").fail(
            f"is {aggregation.min_updates} but there are only {len(facilities)} facilities"
        )
    eval_batch = _int(top.get("eval_batch_size", 16), where / "eval_batch_size", 1)
    return FederationSpec(
        name,
        rounds,
        model,
        test_set,
        training,
        aggregation,
        aggregator,
        tuple(facilities),
        source.resolve(),
        eval_batch,
        round_deadline,
        recovery,
    )


def load_federation(path: Path) -> FederationSpec:
    """Read and validate federation.yml."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise InputError(f"{path.name} is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    try:
        data = YAML(typ="safe", pure=True).load(text)
    except YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise InputError(f"{path.name}:{at} is not valid YAML ({problem})") from exc
    except (ValueError, RecursionError) as exc:  # an integer of thousands of digits, or absurd nesting
        why = "an integer has more than 4300 digits" if "integer string conversion" in str(exc) else str(exc)[:120]
        raise InputError(f"{path.name}: cannot be read as YAML ({why}); fix that value") from exc
    return parse_federation(data, path)
