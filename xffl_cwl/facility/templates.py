"""SLURM job templates: the per-system presets in slurm/, or a user's own Jinja2 file.

A template is a batch script whose `{{ streamflow_command }}` is the job StreamFlow wants to run.
It receives the facility's sbatch options, container settings and setup lines as variables. A
preset declares its defaults once, at the top, as `{% set defaults = {...} %}`; they fill every
variable the facility leaves unset, and the generator and preflight read them from there too
(GPUs per node and vendor, partition, container runtime).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from jinja2 import Environment, TemplateSyntaxError, meta

from xffl_cwl.contract.facility import ContainerSettings, SbatchOptions
from xffl_cwl.facility.container_command import container_variables, standard_options

TEMPLATE_SUFFIXES = (".sh", ".j2", ".jinja2")


class TemplateError(ValueError):
    """A template that cannot be used; the message names it and the fix."""


def _environment() -> Environment:
    env = Environment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True, autoescape=False)
    env.filters["q"] = lambda value: shlex.quote(str(value))  # `{{ container_image | q }}`: one shell word
    return env


def _preset_dir():
    return resources.files("xffl_cwl.resources") / "slurm"


def presets() -> tuple[str, ...]:
    """The preset names: the templates shipped in slurm/."""
    return tuple(sorted(p.name[: -len(".sh")] for p in _preset_dir().iterdir() if p.name.endswith(".sh")))


def is_template_file(reference: str) -> bool:
    """A reference names a file (rather than a preset) when it looks like a path."""
    return "/" in reference or reference.endswith(TEMPLATE_SUFFIXES)


@dataclass(frozen=True)
class Template:
    """A loaded, checked template and the defaults it declares."""

    name: str
    text: str
    defaults: dict[str, Any]

    def default(self, key: str) -> Any:
        return self.defaults.get(key)

    @property
    def gpu_vendor(self) -> str | None:
        """nvidia, amd or None (CPU-only), as the template declares."""
        return self.defaults.get("gpu_vendor")

    def render(self, command: str, variables: dict[str, Any]) -> str:
        values = dict(self.defaults)
        values.update({k: v for k, v in variables.items() if v is not None})
        default_runtime = self.default("container_runtime") or "none"
        runtime = variables.get("container_runtime") or default_runtime
        options = variables.get("container_options")
        if options is None and runtime != default_runtime:  # the template's options are for its own runtime
            gpus = int(values.get("gpus_per_node") or 0)
            options = " ".join(standard_options(runtime, self.gpu_vendor, gpus))
            values["container_options"] = options
        values |= container_variables(values, runtime, values.get("container_options") or "")
        return _environment().from_string(self.text).render(streamflow_command=command, **values)


def parse_template(text: str, name: str) -> Template:
    """Check a template's Jinja2 and its mandatory placeholder, and read its declared defaults."""
    env = _environment()
    try:
        variables = meta.find_undeclared_variables(env.parse(text))
        module = env.from_string(text).make_module({"streamflow_command": ""})
    except TemplateSyntaxError as exc:
        raise TemplateError(f"SLURM template {name} is not valid Jinja2 (line {exc.lineno}: {exc.message})") from exc
    except Exception as exc:  # a template that cannot render with no settings: report it, whatever it raised
        raise TemplateError(f"SLURM template {name} does not render ({type(exc).__name__}: {exc})") from exc
    if "streamflow_command" not in variables:
        raise TemplateError(
            f"SLURM template {name} has no {{{{streamflow_command}}}} placeholder; add it where the job's command must run"
        )
    defaults = getattr(module, "defaults", None)
    if defaults is not None and not isinstance(defaults, dict):
        raise TemplateError(f"SLURM template {name}: `defaults` must be a mapping ({{% set defaults = {{...}} %}})")
    return Template(name, text, dict(defaults or {}))


def load_template(reference: str, base_dir: Path) -> Template:
    """A preset name, or a file path (relative to `base_dir`)."""
    if not is_template_file(reference):
        if reference not in presets():
            raise TemplateError(
                f"unknown SLURM template preset {reference!r}; use one of {', '.join(presets())} or a path to a template file"
            )
        return parse_template((_preset_dir() / f"{reference}.sh").read_text(encoding="utf-8"), reference)
    path = (Path(base_dir) / Path(reference).expanduser()).resolve()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TemplateError(f"SLURM template {path} cannot be read ({exc.strerror})") from exc
    return parse_template(text, str(path))


def job_variables(sbatch: SbatchOptions, container: ContainerSettings, setup: tuple[str, ...]) -> dict[str, Any]:
    """Template variables from a facility's settings; unset ones are None, so the template's defaults apply."""
    values: dict[str, Any] = {name: getattr(sbatch, name) for name in sbatch.set_values()}
    values |= {
        "extra_sbatch": list(sbatch.extra),
        "setup": list(setup),
        "container_runtime": container.runtime,
        "container_image": container.image,
        "container_options": None if container.options is None else " ".join(shlex.quote(o) for o in container.options),
        "container_binds": " ".join(f"--bind {shlex.quote(str(p))}" for p in container.bind),
        "container_bind_paths": [str(p) for p in container.bind],
    }
    return values


def effective_runtime(template: Template, container: ContainerSettings) -> str:
    return container.runtime or template.default("container_runtime") or "none"


def effective_partition(template: Template, sbatch: SbatchOptions) -> str | None:
    return sbatch.partition or template.default("partition")


def nvidia_gpus(template: Template, sbatch: SbatchOptions) -> int:
    """GPUs per node a job asks for when they are NVIDIA ones (what cwltool's CUDARequirement describes)."""
    if template.gpu_vendor != "nvidia":
        return 0
    return gpus_per_node(template, sbatch)


def gpus_per_node(template: Template, sbatch: SbatchOptions) -> int:
    return sbatch.gpus_per_node if sbatch.gpus_per_node is not None else int(template.default("gpus_per_node") or 0)


def training_world(template: Template, sbatch: SbatchOptions) -> tuple[int, int]:
    """(nodes, workers per node) of a train job: the presets' `--nodes` and `--ntasks-per-node`,
    one worker per GPU unless ntasks_per_node says otherwise (CPU nodes: 1)."""
    nodes = sbatch.nodes if sbatch.nodes is not None else int(template.default("nodes") or 1)
    tasks = sbatch.ntasks_per_node or template.default("ntasks_per_node") or gpus_per_node(template, sbatch) or 1
    return nodes, int(tasks)
