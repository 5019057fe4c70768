"""An HPC facility's settings, as federation.yml gives them and as the `xffl-facility` StreamFlow
deployment takes them: the generator writes them into streamflow.yml, the plugin reads them back,
the run-folder reader hands them to preflight. The camelCase spelling of streamflow.yml exists
only in `to_streamflow` / `from_streamflow`; its JSON schema is held to these fields by a test.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from typing import Any

# sbatch's own names for the options a facility may set
SBATCH_FLAGS: dict[str, str] = {
    "account": "--account",
    "partition": "--partition",
    "qos": "--qos",
    "time": "--time",
    "nodes": "--nodes",
    "gpus_per_node": "--gpus-per-node",
    "ntasks_per_node": "--ntasks-per-node",
    "cpus_per_task": "--cpus-per-task",
    "mem": "--mem",
    "constraint": "--constraint",
    "reservation": "--reservation",
    "job_name": "--job-name",
}
CONTAINER_RUNTIMES = ("apptainer", "singularity", "podman", "none")

# What may reach a job script unquoted: #SBATCH lines and sbatch flags are not shell, but a newline or a
# quote there would start a new line or word. Values outside these sets are refused, not escaped.
CONTROL = re.compile(r"[\x00-\x1f\x7f\u0085\u2028\u2029]")
SAFE_WORD = re.compile(r"^[A-Za-z0-9_.,:+=@%/-]+$")
SAFE_CONSTRAINT = re.compile(r"^[A-Za-z0-9_.,:+=@%/&|\[\]*()!-]+$")  # SLURM's feature expressions
SAFE_TIME = re.compile(r"^[0-9:-]+$")
SAFE_FLAG = re.compile(r"^--[A-Za-z][A-Za-z0-9-]*(=[A-Za-z0-9_.,:+=@%/&|\[\]*()!-]*)?$")
SAFE_PATH = re.compile(r"^/[A-Za-z0-9_.,+=@%/-]*$")  # facility paths that StreamFlow and jobs use unquoted
SAFE_HOST = re.compile(r"^[A-Za-z0-9_.:\[\]-]+$")
SAFE_USER = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_.-]*$")


def control_character(text: str) -> str | None:
    """The first control character of a string (a newline, a NUL, ...), shown escaped; None if there is none."""
    match = CONTROL.search(text)
    return None if match is None else repr(match[0])


def camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


@dataclass(frozen=True)
class SbatchOptions:
    """sbatch options set explicitly for a facility; unset ones take the template's defaults."""

    account: str | None = None
    partition: str | None = None
    qos: str | None = None
    time: str | None = None
    nodes: int | None = None
    gpus_per_node: int | None = None
    ntasks_per_node: int | None = None  # training workers per node; default one per GPU, else 1
    cpus_per_task: int | None = None
    mem: str | None = None
    constraint: str | None = None
    reservation: str | None = None
    job_name: str | None = None
    extra: tuple[str, ...] = ()

    def set_values(self) -> dict[str, Any]:
        """The options that were set, in declaration order (extra excluded)."""
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name != "extra" and getattr(self, f.name) is not None
        }

    def flags(self) -> list[str]:
        """Command-line flags for what was set: they win over the template's #SBATCH lines."""
        return [f"{SBATCH_FLAGS[k]}={v}" for k, v in self.set_values().items()] + list(self.extra)

    def to_streamflow(self) -> dict[str, Any]:
        out: dict[str, Any] = {camel(k): v for k, v in self.set_values().items()}
        if self.extra:
            out["extra"] = list(self.extra)
        return out

    @classmethod
    def from_streamflow(cls, data: dict[str, Any] | None) -> SbatchOptions:
        data = dict(data or {})
        extra = tuple(data.pop("extra", ()) or ())
        names = {camel(f.name): f.name for f in fields(cls)}
        return cls(**{names[k]: v for k, v in data.items() if k in names}, extra=extra)


@dataclass(frozen=True)
class ContainerSettings:
    """How a facility's jobs run their command: a runtime (None: the template's), an image, options, binds."""

    runtime: str | None = None
    image: str | None = None
    options: tuple[str, ...] | None = None  # None: the template's options
    bind: tuple[str, ...] = ()

    def to_streamflow(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.runtime is not None:
            out["runtime"] = self.runtime
        if self.image is not None:
            out["image"] = self.image
        if self.options is not None:
            out["options"] = list(self.options)
        if self.bind:
            out["bind"] = list(self.bind)
        return out

    @classmethod
    def from_streamflow(cls, data: dict[str, Any] | None) -> ContainerSettings:
        data = data or {}
        options = data.get("options")
        return cls(
            data.get("runtime"),
            data.get("image"),
            None if options is None else tuple(options),
            tuple(data.get("bind") or ()),
        )


@dataclass(frozen=True, kw_only=True)
class FacilityConfig:
    """One `xffl-facility` deployment: SSH to the login node, every job a SLURM batch job."""

    host: str
    port: int = 22
    username: str
    ssh_key: str | None = None
    known_hosts: str | None = None
    check_host_key: bool = True
    ssh_key_passphrase_file: str | None = None
    password_file: str | None = None
    template: str = "generic"
    sbatch: SbatchOptions = field(default_factory=SbatchOptions)
    container: ContainerSettings = field(default_factory=ContainerSettings)
    setup: tuple[str, ...] = ()
    max_concurrent_jobs: int = 4
    polling_interval: float = 5.0
    connect_timeout: int = 30
    retries: int = 3
    retry_delay: int = 5
    unreachable_timeout: int = 600  # seconds a facility may stay unreachable before its job counts as lost
    max_concurrent_sessions: int = 10
    transfer_buffer_size: int = 2**16

    # Written to streamflow.yml even at their default, so a reader sees how the facility is polled.
    ALWAYS_WRITTEN = ("host", "port", "username", "template", "max_concurrent_jobs", "polling_interval")

    def to_streamflow(self) -> dict[str, Any]:
        """The deployment's `config:` in streamflow.yml: set values, in a fixed order."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, SbatchOptions | ContainerSettings):
                value = value.to_streamflow()
                if value:
                    out[camel(f.name)] = value
            elif f.name in self.ALWAYS_WRITTEN or value != f.default:
                out[camel(f.name)] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_streamflow(cls, data: dict[str, Any]) -> FacilityConfig:
        names = {camel(f.name): f.name for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in data.items():
            name = names.get(key)
            if name is None:
                raise ValueError(f"unknown xffl-facility setting {key!r}")
            if name == "sbatch":
                value = SbatchOptions.from_streamflow(value)
            elif name == "container":
                value = ContainerSettings.from_streamflow(value)
            elif name == "setup":
                value = tuple(value or ())
            values[name] = value
        return cls(**values)


def _pattern(value: object, pattern: re.Pattern, what: str) -> str | None:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        return f"{value!r:.60} is not {what}"
    return None


def facility_problems(config: FacilityConfig, workdir: str | None = None) -> list[tuple[str, str]]:
    """(setting, problem) for every value that could change a job script's meaning; empty when all are safe.

    Setting names are federation.yml's (sbatch.partition, container.image, ...). `setup` lines are shell
    on purpose and only refused with control characters; the container image and binds are quoted by
    the templates, so they only must be printable.
    """
    out: list[tuple[str, str]] = []

    def check(key: str, problem: str | None) -> None:
        if problem:
            out.append((key, problem))

    check("host", _pattern(config.host, SAFE_HOST, "a host name or address"))
    check("username", _pattern(config.username, SAFE_USER, "a login name (letters, digits, _ . -)"))
    if workdir is not None:
        check("workdir", _pattern(workdir, SAFE_PATH, "an absolute path of letters, digits and _ . , + = @ % / -"))
    for key, value in config.sbatch.set_values().items():
        if key == "time":
            check("sbatch.time", _pattern(value, SAFE_TIME, 'a SLURM time such as "01:30:00"'))
        elif isinstance(value, str):
            pattern = SAFE_CONSTRAINT if key == "constraint" else SAFE_WORD
            check(f"sbatch.{key}", _pattern(value, pattern, "a single word of letters, digits and _ . , : + = @ % / -"))
    for i, flag in enumerate(config.sbatch.extra):
        check(f"sbatch.extra[{i}]", _pattern(flag, SAFE_FLAG, "an sbatch flag such as --exclusive or --gres=gpu:4"))
    texts = [("container.image", config.container.image)]
    texts += [(f"container.options[{i}]", v) for i, v in enumerate(config.container.options or ())]
    texts += [(f"container.bind[{i}]", v) for i, v in enumerate(config.container.bind)]
    texts += [(f"setup[{i}]", v) for i, v in enumerate(config.setup)]
    texts += [("template", config.template)]
    for key, value in texts:
        if isinstance(value, str) and (bad := control_character(value)):
            out.append((key, f"holds the control character {bad}; write it on one line without it"))
    if config.container.runtime not in (None, *CONTAINER_RUNTIMES):
        out.append(("container.runtime", f"must be one of {', '.join(CONTAINER_RUNTIMES)}"))
    return out
