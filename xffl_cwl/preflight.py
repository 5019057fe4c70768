"""Preflight: is every facility ready for a run? Checked over SSH before any job is submitted.

It reads the facilities as StreamFlow will use them (the `xffl-facility` entries of streamflow.yml,
or the ones a federation.yml generates), logs in once per facility with the same key and
known_hosts, and checks what a job needs: sbatch, the partition, the container runtime and
image (or xffl-cwl itself when jobs run without a container), the dataset and a writable workdir.
"""

from __future__ import annotations

import asyncio
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xffl_cwl.slurm_templates import TemplateError, default_runtime, load_template


@dataclass(frozen=True)
class FacilityTarget:
    """One facility to check: its xffl-facility config, as in streamflow.yml."""

    name: str
    kind: str  # "slurm" or "local"
    config: dict[str, Any]
    workdir: str
    dataset: str | None
    config_dir: Path


@dataclass(frozen=True)
class Check:
    facility: str
    what: str
    ok: bool | None  # None: not checked, because an earlier check failed
    detail: str
    fix: str = ""


def _partition(config: dict[str, Any], template: str | None) -> str | None:
    explicit = (config.get("sbatch") or {}).get("partition")
    if explicit or template is None:
        return explicit
    match = re.search(r"partition\s*\|\s*default\(\s*['\"]([^'\"]+)['\"]", template)
    return match[1] if match else None


async def _connect(target: FacilityTarget, checks: list[Check]):
    """Log in like the connector does; record what failed and why."""
    import asyncssh

    c = target.config
    host, port, user = c["host"], int(c.get("port", 22)), c["username"]
    key = c.get("sshKey")
    known_hosts = c.get("knownHosts")
    key_path = None if key is None else (target.config_dir / Path(key).expanduser()).resolve()
    known_path = None if known_hosts is None else (target.config_dir / Path(known_hosts).expanduser()).resolve()
    if key_path is not None and not key_path.is_file():
        checks.append(Check(target.name, "ssh key", False, f"{key_path} does not exist", "fix sshKey / ssh_key to point at your private key"))
        return None
    if known_path is not None and not known_path.is_file():
        checks.append(Check(target.name, "known hosts", False, f"{known_path} does not exist", "fix knownHosts / known_hosts, or create it with ssh-keyscan"))
        return None
    check_host_key = c.get("checkHostKey", True)
    try:
        connection = await asyncssh.connect(
            host=host,
            port=port,
            username=user,
            client_keys=[str(key_path)] if key_path else (),
            known_hosts=(str(known_path) if known_path else ()) if check_host_key else None,
            connect_timeout=min(int(c.get("connectTimeout", 30)), 15),
        )
    except asyncssh.HostKeyNotVerifiable as exc:
        where = known_path or "~/.ssh/known_hosts"
        checks.append(Check(target.name, "host key", False, f"{host}:{port} is not trusted by {where} ({exc.reason})", f"verify its fingerprint, then: ssh-keyscan -p {port} {host} >> {where}"))
        return None
    except asyncssh.PermissionDenied:
        checks.append(Check(target.name, "login", False, f"{host}:{port} refused user {user} with key {key_path or '(default keys)'}", f"authorize the public key for {user}, or fix username / ssh_key"))
        return None
    except (OSError, asyncssh.Error, asyncio.TimeoutError) as exc:
        checks.append(Check(target.name, "reachable", False, f"cannot reach {host}:{port} ({exc or type(exc).__name__})", "check host and port, and that this machine can reach the login node"))
        return None
    checks.append(Check(target.name, "login", True, f"{user}@{host}:{port}, host key known" if check_host_key else f"{user}@{host}:{port}, host key NOT checked"))
    return connection


async def _run(connection, command: str) -> tuple[int, str]:
    result = await connection.run(command, check=False)
    return result.exit_status or 0, f"{result.stdout or ''}{result.stderr or ''}".strip()


async def _check_slurm(target: FacilityTarget) -> list[Check]:
    checks: list[Check] = []
    c = target.config
    template = None
    try:
        template = load_template(c.get("template", "generic"), target.config_dir)
        checks.append(Check(target.name, "template", True, str(c.get("template", "generic"))))
    except TemplateError as exc:
        checks.append(Check(target.name, "template", False, str(exc), "use a preset name or a template file with {{streamflow_command}}"))
    connection = await _connect(target, checks)
    if connection is None:
        return checks + [Check(target.name, "rest", None, "not checked: cannot log in")]
    setup = "; ".join(c.get("setup") or []) or "true"
    try:
        code, out = await _run(connection, "command -v sbatch && sinfo --version")
        checks.append(Check(target.name, "sbatch", code == 0, out.splitlines()[-1] if code == 0 and out else "sbatch not found on the login node", "" if code == 0 else "is this a SLURM login node? load the slurm module in your shell profile"))
        partition = _partition(c, template)
        if partition:
            code, out = await _run(connection, f"sinfo -h -p {shlex.quote(partition)} -o %P")
            checks.append(Check(target.name, "partition", code == 0 and bool(out), partition if out else f"partition {partition} does not exist", "" if out else "set sbatch.partition to one `sinfo -s` lists"))
        runtime = (c.get("container") or {}).get("runtime") or (default_runtime(template) if template else "none")
        if runtime == "none":
            code, out = await _run(connection, f"bash -c {shlex.quote(setup + '; command -v xffl-cwl')}")
            checks.append(Check(target.name, "xffl-cwl", code == 0, out.splitlines()[-1] if code == 0 else "xffl-cwl is not on PATH after the setup lines", "" if code == 0 else "install xffl-cwl there, or add the line that activates its environment to setup"))
        else:
            image = (c.get("container") or {}).get("image", "")
            code, out = await _run(connection, f"bash -c {shlex.quote(setup + f'; command -v {runtime}')}")
            checks.append(Check(target.name, "container runtime", code == 0, out.splitlines()[-1] if code == 0 and out else f"{runtime} not found after the setup lines", "" if code == 0 else f"add `module load {runtime}` (or the site's module) to setup"))
            code, _ = await _run(connection, f"test -r {shlex.quote(image)}")
            checks.append(Check(target.name, "container image", code == 0 and bool(image), image or "no image configured", "" if code == 0 else "build containers/client.def and copy the .sif to that path"))
        if target.dataset:
            code, _ = await _run(connection, f"test -e {shlex.quote(target.dataset)}")
            checks.append(Check(target.name, "dataset", code == 0, target.dataset if code == 0 else f"{target.dataset} does not exist", "" if code == 0 else "copy the facility's data there, or fix dataset"))
        probe = f"{target.workdir}/.xffl-check"
        code, out = await _run(connection, f"mkdir -p {shlex.quote(target.workdir)} && touch {shlex.quote(probe)} && rm -f {shlex.quote(probe)}")
        checks.append(Check(target.name, "workdir", code == 0, target.workdir if code == 0 else f"{target.workdir} is not writable: {out}", "" if code == 0 else "choose a workdir on a file system you can write (scratch)"))
    finally:
        connection.close()
    return checks


def _check_local(target: FacilityTarget) -> list[Check]:
    checks = []
    if target.dataset:
        exists = Path(target.dataset).exists()
        checks.append(Check(target.name, "dataset", exists, target.dataset if exists else f"{target.dataset} does not exist", "" if exists else "fix the dataset path"))
    if not Path(target.workdir).is_absolute() and not target.config_dir.joinpath("streamflow.yml").is_file():
        return checks  # a run folder's own work/<name>: created when the folder is generated
    workdir = (target.config_dir / target.workdir).resolve()
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / ".xffl-check").touch()
        (workdir / ".xffl-check").unlink()
        checks.append(Check(target.name, "workdir", True, str(workdir)))
    except OSError as exc:
        checks.append(Check(target.name, "workdir", False, f"{workdir} is not writable ({exc.strerror})", "choose another workdir"))
    return checks


def run_checks(targets: list[FacilityTarget]) -> list[Check]:
    """All facilities at once; each facility's checks in order."""

    async def all_checks() -> list[list[Check]]:
        return await asyncio.gather(*(_check_slurm(t) if t.kind == "slurm" else asyncio.to_thread(_check_local, t) for t in targets))

    return [check for group in asyncio.run(all_checks()) for check in group]


def targets_from_streamflow(config: dict[str, Any], bindings: list[dict[str, Any]], inputs: dict[str, Any], config_dir: Path, names: list[str]) -> list[FacilityTarget]:
    """Facilities as streamflow.yml describes them; datasets from port bindings and inputs.yml."""
    ports = {b["port"].lstrip("/"): b["target"] for b in bindings if "port" in b}
    targets = []
    for name in names:
        entry = config["deployments"][name]
        dataset = None
        port_target = ports.get(f"dataset_{name}")
        value = inputs.get(f"dataset_{name}")
        if isinstance(value, dict) and value.get("path"):
            dataset = value["path"]
            if port_target is not None and port_target.get("workdir"):
                dataset = str(Path(port_target["workdir"]) / dataset)
            elif entry["type"] == "local":
                dataset = str((config_dir / dataset).resolve())
        kind = "slurm" if entry["type"] == "xffl-facility" else "local"
        targets.append(FacilityTarget(name, kind, dict(entry.get("config") or {}), str(entry.get("workdir") or f"work/{name}"), dataset, config_dir))
    return targets


def table(checks: list[Check]) -> str:
    rows = [("facility", "check", "result", "detail", "fix")]
    for c in checks:
        rows.append((c.facility, c.what, "ok" if c.ok else ("FAIL" if c.ok is False else "-"), c.detail, c.fix))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(r[i].ljust(widths[i]) for i in range(4)) + (f"  {r[4]}" if r[4] else "") for r in rows)


async def remote_tail(config: dict[str, Any], config_dir: Path, path: str, lines: int = 3) -> str | None:
    """The last lines of a facility file (a failed job's log), or None when it cannot be read."""
    checks: list[Check] = []
    target = FacilityTarget("", "slurm", config, "", None, config_dir)
    connection = await _connect(target, checks)
    if connection is None:
        return None
    try:
        code, out = await _run(connection, f"tail -n {lines} {shlex.quote(path)}")
        return out if code == 0 else None
    finally:
        connection.close()
