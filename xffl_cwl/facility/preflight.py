"""Preflight: is every facility ready for a run? Checked over SSH before any job is submitted.

Targets come from a federation (`xffl-cwl check`) or from a run folder's streamflow.yml (`xffl-cwl
run`); either way each facility is logged in to once, with the options the plugin will use, and
checked for what a job needs: sbatch, the partition, the container runtime and image (or xffl-cwl
itself when jobs run without a container), the dataset and a writable workdir.
"""

from __future__ import annotations

import asyncio
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from xffl_cwl.contract.facility import FacilityConfig
from xffl_cwl.facility.ssh import Login, LoginProblem, connect, explain
from xffl_cwl.facility.templates import TemplateError, effective_partition, effective_runtime, load_template

PREFLIGHT_LOGIN_TIMEOUT = 15


@dataclass(frozen=True)
class FacilityTarget:
    """One facility to check. `config` is None for a local deployment."""

    name: str
    config: FacilityConfig | None
    workdir: str | None  # None: a local deployment's own folder inside the run folder, made with it
    dataset: str | None
    config_dir: Path

    @property
    def kind(self) -> str:
        return "local" if self.config is None else "slurm"


@dataclass(frozen=True)
class Check:
    facility: str
    what: str
    ok: bool | None  # None: not checked, because an earlier check failed
    detail: str
    fix: str = ""


async def _login(target: FacilityTarget, checks: list[Check]):
    """Log in like the plugin does; record what failed and why."""
    assert target.config is not None
    login = Login.of(target.config, target.config_dir)
    problem = login.missing_file()
    if problem is None:
        try:
            connection = await connect(login, timeout=min(login.connect_timeout, PREFLIGHT_LOGIN_TIMEOUT))
        except Exception as exc:  # every way a login fails is reported, none escapes
            problem = explain(exc, login)
        else:
            shown = f"{login.username}@{login.host}:{login.port}"
            checks.append(
                Check(
                    target.name,
                    "login",
                    True,
                    f"{shown}, host key known" if login.check_host_key else f"{shown}, host key NOT checked",
                )
            )
            return connection
    checks.append(Check(target.name, problem.what, False, problem.detail, problem.fix))
    return None


async def _run(connection, command: str) -> tuple[int, str]:
    result = await connection.run(command, check=False)
    return result.exit_status or 0, f"{result.stdout or ''}{result.stderr or ''}".strip()


async def _check_slurm(target: FacilityTarget) -> list[Check]:
    checks: list[Check] = []
    c = target.config
    assert c is not None and target.workdir is not None
    template = None
    try:
        template = load_template(c.template, target.config_dir)
        checks.append(Check(target.name, "template", True, c.template))
    except TemplateError as exc:
        checks.append(
            Check(
                target.name,
                "template",
                False,
                str(exc),
                "use a preset name or a template file with {{streamflow_command}}",
            )
        )
    connection = await _login(target, checks)
    if connection is None:
        return [*checks, Check(target.name, "rest", None, "not checked: cannot log in")]
    setup = "; ".join(c.setup) or "true"
    try:
        code, out = await _run(connection, "command -v sbatch && sinfo --version")
        checks.append(
            Check(
                target.name,
                "sbatch",
                code == 0,
                out.splitlines()[-1] if code == 0 and out else "sbatch not found on the login node",
                "" if code == 0 else "is this a SLURM login node? load the slurm module in your shell profile",
            )
        )
        partition = effective_partition(template, c.sbatch) if template else c.sbatch.partition
        if partition:
            code, out = await _run(connection, f"sinfo -h -p {shlex.quote(partition)} -o %P")
            ok = code == 0 and bool(out)
            checks.append(
                Check(
                    target.name,
                    "partition",
                    ok,
                    partition if ok else f"partition {partition} does not exist",
                    "" if ok else "set sbatch.partition to one `sinfo -s` lists",
                )
            )
        runtime = effective_runtime(template, c.container) if template else (c.container.runtime or "none")
        if runtime == "none":
            code, out = await _run(connection, f"bash -c {shlex.quote(setup + '; command -v xffl-cwl')}")
            checks.append(
                Check(
                    target.name,
                    "xffl-cwl",
                    code == 0,
                    out.splitlines()[-1] if code == 0 else "xffl-cwl is not on PATH after the setup lines",
                    ""
                    if code == 0
                    else "install xffl-cwl there, or add the line that activates its environment to setup",
                )
            )
        else:
            image = c.container.image or ""
            code, out = await _run(connection, f"bash -c {shlex.quote(setup + f'; command -v {shlex.quote(runtime)}')}")
            checks.append(
                Check(
                    target.name,
                    "container runtime",
                    code == 0,
                    out.splitlines()[-1] if code == 0 and out else f"{runtime} not found after the setup lines",
                    "" if code == 0 else f"add `module load {runtime}` (or the site's module) to setup",
                )
            )
            if code == 0:
                checks.append(await _check_image(connection, target.name, runtime, image, setup))
            else:
                checks.append(Check(target.name, "container image", None, f"not checked: no {runtime} here"))
        if target.dataset:
            code, _ = await _run(connection, f"test -e {shlex.quote(target.dataset)}")
            checks.append(
                Check(
                    target.name,
                    "dataset",
                    code == 0,
                    target.dataset if code == 0 else f"{target.dataset} does not exist",
                    "" if code == 0 else "copy the facility's data there, or fix dataset",
                )
            )
        probe = f"{target.workdir}/.xffl-check"
        code, out = await _run(
            connection,
            f"mkdir -p {shlex.quote(target.workdir)} && touch {shlex.quote(probe)} && rm -f {shlex.quote(probe)}",
        )
        checks.append(
            Check(
                target.name,
                "workdir",
                code == 0,
                target.workdir if code == 0 else f"{target.workdir} is not writable: {out}",
                "" if code == 0 else "choose a workdir on a file system you can write (scratch)",
            )
        )
    finally:
        connection.close()
    return checks


async def _check_image(connection, name: str, runtime: str, image: str, setup: str) -> Check:
    """The image is there for the login user: in podman's storage, or a readable .sif."""
    if not image:
        return Check(name, "container image", False, "no image configured", "set container.image for this facility")
    if runtime == "podman":
        probe = f"podman image inspect --format '{{{{.Id}}}}' {shlex.quote(image)}"
        code, out = await _run(connection, f"bash -c {shlex.quote(setup + '; ' + probe)}")
        ids = re.findall(r"\b(?:sha256:)?([0-9a-f]{64})\b", out)  # podman may warn on stderr too
        found = code == 0 and bool(ids)
        return Check(
            name,
            "container image",
            found,
            f"{image} (sha256:{ids[-1][:12]})" if found else f"{image} is not in this user's podman storage",
            "" if found else "load it there: podman load -i xffl-cwl-VERSION.tar (bash containers/build.sh --save DIR)",
        )
    code, _ = await _run(connection, f"test -r {shlex.quote(image)}")
    return Check(
        name,
        "container image",
        code == 0,
        image if code == 0 else f"{image} cannot be read",
        "" if code == 0 else "build the .sif (containers/README.md) and copy it to that path",
    )


def _check_local(target: FacilityTarget) -> list[Check]:
    checks = []
    if target.dataset:
        exists = Path(target.dataset).exists()
        checks.append(
            Check(
                target.name,
                "dataset",
                exists,
                target.dataset if exists else f"{target.dataset} does not exist",
                "" if exists else "fix the dataset path",
            )
        )
    if target.workdir is None:
        return checks
    workdir = (target.config_dir / target.workdir).resolve()
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / ".xffl-check").touch()
        (workdir / ".xffl-check").unlink()
        checks.append(Check(target.name, "workdir", True, str(workdir)))
    except OSError as exc:
        checks.append(
            Check(
                target.name, "workdir", False, f"{workdir} is not writable ({exc.strerror})", "choose another workdir"
            )
        )
    return checks


def run_checks(targets: list[FacilityTarget]) -> list[Check]:
    """All facilities at once; each facility's checks in order."""

    async def all_checks() -> list[list[Check]]:
        return await asyncio.gather(
            *(_check_slurm(t) if t.config is not None else asyncio.to_thread(_check_local, t) for t in targets)
        )

    return [check for group in asyncio.run(all_checks()) for check in group]


def table(checks: list[Check]) -> str:
    rows = [("facility", "check", "result", "detail", "fix")]
    for c in checks:
        rows.append((c.facility, c.what, "ok" if c.ok else ("FAIL" if c.ok is False else "-"), c.detail, c.fix))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(r[i].ljust(widths[i]) for i in range(4)) + (f"  {r[4]}" if r[4] else "") for r in rows)


async def remote_tail(config: FacilityConfig, config_dir: Path, path: str, lines: int = 3) -> str | None:
    """The last lines of a facility file (a failed job's log), or None when it cannot be read."""
    login = Login.of(config, config_dir)
    try:
        connection = await connect(login, timeout=PREFLIGHT_LOGIN_TIMEOUT)
    except (LoginProblem, Exception):
        return None
    try:
        code, out = await _run(connection, f"tail -n {int(lines)} {shlex.quote(path)}")
        return out if code == 0 else None
    finally:
        connection.close()


def targets_of(spec) -> list[FacilityTarget]:
    """The facilities of a federation (a FederationSpec), as `xffl-cwl check` checks them."""
    from xffl_cwl.federation.spec import LocalDeployment

    base = spec.source.parent if spec.source else Path.cwd()
    targets = []
    for f in spec.facilities:
        d = f.deployment
        if isinstance(d, LocalDeployment):
            targets.append(FacilityTarget(f.name, None, None if d.workdir is None else str(d.workdir), f.dataset, base))
        else:
            targets.append(FacilityTarget(f.name, d.facility, d.workdir, f.dataset, base))
    return targets
