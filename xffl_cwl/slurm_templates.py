"""SLURM job templates: the per-system presets in slurm/, or a user's own Jinja2 file.

A template is a batch script whose `{{ streamflow_command }}` is the job StreamFlow wants to run.
It receives the facility's sbatch options (account, partition, qos, time, ...), the container
settings and setup lines as variables; the presets give each system's defaults for them.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from jinja2 import Environment, TemplateSyntaxError, meta

PRESETS = ("deucalion", "discoverer", "generic", "karolina", "leonardo", "lumi", "marenostrum5", "meluxina", "vega")

# sbatch options a facility may set: config key -> (template variable, sbatch flag)
SBATCH_OPTIONS: dict[str, tuple[str, str]] = {
    "account": ("account", "--account"),
    "partition": ("partition", "--partition"),
    "qos": ("qos", "--qos"),
    "time": ("time", "--time"),
    "nodes": ("nodes", "--nodes"),
    "gpusPerNode": ("gpus_per_node", "--gpus-per-node"),
    "cpusPerTask": ("cpus_per_task", "--cpus-per-task"),
    "mem": ("mem", "--mem"),
    "constraint": ("constraint", "--constraint"),
    "reservation": ("reservation", "--reservation"),
    "jobName": ("job_name", "--job-name"),
}


class TemplateError(ValueError):
    """A template that cannot be used; the message names it and the fix."""


def _environment() -> Environment:
    return Environment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True, autoescape=False)


def preset_text(name: str) -> str:
    if name not in PRESETS:
        raise TemplateError(f"unknown SLURM template preset {name!r}; use one of {', '.join(PRESETS)} or a path to a template file")
    return (resources.files("xffl_cwl.resources") / "slurm" / f"{name}.sh").read_text(encoding="utf-8")


def load_template(template: str, base_dir: Path) -> str:
    """A preset name, or a file path (relative to `base_dir`); checked for the mandatory placeholder."""
    if "/" not in template and not template.endswith((".sh", ".j2", ".jinja2")):
        text = preset_text(template)
    else:
        path = (Path(base_dir) / Path(template).expanduser()).resolve()
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise TemplateError(f"SLURM template {path} cannot be read ({exc.strerror})") from exc
    check_template(text, template)
    return text


def check_template(text: str, name: str) -> None:
    try:
        variables = meta.find_undeclared_variables(_environment().parse(text))
    except TemplateSyntaxError as exc:
        raise TemplateError(f"SLURM template {name} is not valid Jinja2 (line {exc.lineno}: {exc.message})") from exc
    if "streamflow_command" not in variables:
        raise TemplateError(f"SLURM template {name} has no {{{{streamflow_command}}}} placeholder; add it where the job's command must run")


def context(sbatch: Mapping[str, Any], container: Mapping[str, Any] | None, setup: list[str]) -> dict[str, Any]:
    """Template variables from a facility's configuration (unset ones are None, so presets' defaults apply)."""
    values: dict[str, Any] = {var: None for var, _ in SBATCH_OPTIONS.values()}
    for key, value in sbatch.items():
        if key in SBATCH_OPTIONS:
            values[SBATCH_OPTIONS[key][0]] = value
    container = container or {}
    values |= {
        "extra_sbatch": list(sbatch.get("extra", [])),
        "setup": list(setup),
        "container_runtime": container.get("runtime"),
        "container_image": container.get("image"),
        "container_options": " ".join(container.get("options", [])) or None,
        "container_binds": " ".join(f"--bind {shlex.quote(str(p))}" for p in container.get("bind", [])),
    }
    return values


def default_runtime(text: str) -> str:
    """The container runtime a template uses when the facility names none (`container_runtime | default(...)`)."""
    match = re.search(r"container_runtime\s*\|\s*default\(\s*['\"](\w+)['\"]", text)
    return match[1] if match else "none"


def default_gpus(text: str) -> tuple[int, bool]:
    """(GPUs per node the template asks for by default, whether they are NVIDIA: no --rocm)."""
    match = re.search(r"gpus_per_node\s*\|\s*default\(\s*(\d+)", text)
    return (int(match[1]) if match else 0), "--rocm" not in text


def render(text: str, command: str, variables: Mapping[str, Any]) -> str:
    return _environment().from_string(text).render(streamflow_command=command, **variables)


def sbatch_flags(sbatch: Mapping[str, Any]) -> list[str]:
    """Command-line flags for the options a facility set explicitly: they win over the template's lines."""
    flags = [f"{SBATCH_OPTIONS[k][1]}={v}" for k, v in sbatch.items() if k in SBATCH_OPTIONS and v is not None]
    return flags + [str(e) for e in sbatch.get("extra", [])]
