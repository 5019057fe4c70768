"""`xffl-facility`: an SSH deployment whose jobs are SLURM batch jobs.

The connector *is* the SSH connector of the login node, so StreamFlow stages data through it as
for any SSH deployment. Only job runs differ: the command is rendered into the facility's
batch template (a preset from slurm/ or the user's file), submitted with sbatch over SSH,
polled with squeue, and its exit code read back with scontrol (sacct if the job has left the
controller's memory). Jobs still queued or running are cancelled when the deployment is undeployed
or the step is cancelled, so a failed or interrupted run leaves nothing behind on the cluster.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import shlex
import time
from collections.abc import MutableMapping, MutableSequence
from importlib.resources import files
from pathlib import Path
from typing import Any

import asyncssh
from streamflow.core import utils
from streamflow.core.deployment import ExecutionLocation
from streamflow.core.exception import WorkflowDefinitionException, WorkflowExecutionException
from streamflow.core.scheduling import AvailableLocation
from streamflow.deployment.connector.ssh import SSHConnector, SSHContext, parse_hostname
from streamflow.log_handler import logger

from xffl_cwl.slurm_templates import TemplateError, context, default_runtime, load_template, render, sbatch_flags

STDOUT = asyncio.subprocess.STDOUT
ACTIVE_STATES = "PENDING,RUNNING,SUSPENDED,COMPLETING,CONFIGURING,RESIZING,REQUEUED,SIGNALING,STAGE_OUT"
FAILED_STATES = ("TIMEOUT", "CANCELLED", "NODE_FAIL", "OUT_OF_MEMORY", "FAILED", "BOOT_FAIL", "DEADLINE", "PREEMPTED")


def _known_hosts_context(known_hosts: str | None) -> type[SSHContext]:
    """StreamFlow's SSH context always reads ~/.ssh/known_hosts; this one reads the facility's file.

    It overrides SSHContext._get_connection (private in StreamFlow 0.2.0rc3, which xffl-cwl pins).
    """

    class FacilitySSHContext(SSHContext):
        async def _get_connection(self, config):  # type: ignore[override]
            if config is None:
                return None
            host, port = parse_hostname(config.hostname)
            return await asyncssh.connect(
                host=host,
                port=port,
                username=config.username,
                client_keys=config.client_keys,
                known_hosts=(known_hosts or ()) if config.check_host_key else None,
                connect_timeout=config.connect_timeout,
                tunnel=await self._get_connection(config.tunnel),
            )

    return FacilitySSHContext


def _resolve(path: str | None, config_dir: str) -> str | None:
    if path is None:
        return None
    candidate = Path(path).expanduser()
    return str(candidate if candidate.is_absolute() else (Path(config_dir) / candidate).resolve())


def _slurm_job_name(job_name: str) -> str:
    """`/federation/train_leonardo/0.1` -> `xffl-train_leonardo-0.1`: readable in squeue and sacct."""
    parts = [p for p in job_name.split("/") if p][-2:]
    return "xffl-" + re.sub(r"[^A-Za-z0-9_.-]", "_", "-".join(parts))[:60]


class XfflFacilityConnector(SSHConnector):
    def __init__(
        self,
        deployment_name: str,
        config_dir: str,
        host: str,
        username: str,
        port: int = 22,
        sshKey: str | None = None,
        knownHosts: str | None = None,
        checkHostKey: bool = True,
        connectTimeout: int = 30,
        retries: int = 3,
        retryDelay: int = 5,
        maxConcurrentSessions: int = 10,
        template: str = "generic",
        sbatch: MutableMapping[str, Any] | None = None,
        container: MutableMapping[str, Any] | None = None,
        setup: MutableSequence[str] | None = None,
        maxConcurrentJobs: int = 4,
        pollingInterval: float = 5,
        transferBufferSize: int = 2**16,
    ) -> None:
        key = _resolve(sshKey, config_dir)
        known_hosts = _resolve(knownHosts, config_dir)
        for option, path in (("sshKey", key), ("knownHosts", known_hosts)):
            if path is not None and not Path(path).is_file():
                raise WorkflowDefinitionException(f"deployment {deployment_name}: {option} {path} does not exist; fix the path in streamflow.yml")
        super().__init__(
            deployment_name=deployment_name,
            config_dir=config_dir,
            nodes=[f"{host}:{port}"],
            username=username,
            checkHostKey=checkHostKey,
            connectTimeout=connectTimeout,
            maxConcurrentSessions=maxConcurrentSessions,
            retries=retries,
            retryDelay=retryDelay,
            sshKey=key,
            transferBufferSize=transferBufferSize,
        )
        self._cls_context = _known_hosts_context(known_hosts)
        self.known_hosts = known_hosts or str(Path("~/.ssh/known_hosts").expanduser())
        try:
            self.template = load_template(template, Path(config_dir))
        except TemplateError as exc:
            raise WorkflowDefinitionException(f"deployment {deployment_name}: {exc}") from exc
        container = dict(container or {})
        runtime = container.get("runtime") or default_runtime(self.template)
        if runtime != "none" and not container.get("image"):
            raise WorkflowDefinitionException(
                f"deployment {deployment_name}: jobs run in {runtime} (template {template}) but container.image is not set; "
                "give the image's path on the facility, or set container.runtime: none"
            )
        self.sbatch = dict(sbatch or {})
        self.variables = context(self.sbatch, container, list(setup or []))
        self.flags = sbatch_flags(self.sbatch)
        self.maxConcurrentJobs = maxConcurrentJobs
        self.pollingInterval = pollingInterval
        self._jobs: dict[str, ExecutionLocation] = {}
        self._poll_lock = asyncio.Lock()
        self._polled_at = float("-inf")
        self._active: set[str] = set()

    @classmethod
    def get_schema(cls) -> str:
        return files(__package__).joinpath("schemas").joinpath("xffl-facility.json").read_text("utf-8")

    async def deploy(self, external: bool) -> None:
        """Log in once now, so a wrong key, an unknown host key or an unreachable host is one clear error."""
        await super().deploy(external)
        node = next(iter(self.nodes.values()))
        host, port = parse_hostname(node.hostname)
        try:
            connection = await self._cls_context(self.config_dir, node, 1)._get_connection(node)
            connection.close()
        except asyncssh.HostKeyNotVerifiable as exc:
            raise WorkflowDefinitionException(
                f"deployment {self.deployment_name}: the host key of {host}:{port} is not trusted by {self.known_hosts} ({exc.reason}); "
                f"check its fingerprint and add it, e.g. ssh-keyscan -p {port} {host} >> {self.known_hosts}"
            ) from exc
        except asyncssh.PermissionDenied as exc:
            raise WorkflowDefinitionException(
                f"deployment {self.deployment_name}: {host}:{port} refused user {node.username} with key {node.client_keys[0] if node.client_keys else '(none)'}"
            ) from exc
        except (OSError, asyncssh.Error, asyncio.TimeoutError) as exc:
            raise WorkflowDefinitionException(f"deployment {self.deployment_name}: cannot reach {host}:{port} ({exc or type(exc).__name__})") from exc

    async def get_available_locations(self, service: str | None = None) -> MutableMapping[str, AvailableLocation]:
        """The login node, with one slot per job the facility may have queued at once (no local hardware limits)."""
        return {
            name: AvailableLocation(name=name, deployment=self.deployment_name, hostname=name, service=service, slots=self.maxConcurrentJobs)
            for name in self.nodes
        }

    async def _shell(self, location: ExecutionLocation, command: list[str]) -> tuple[str, int]:
        result = await super().run(location=location, command=command, capture_output=True)
        assert result is not None
        return result

    async def run(
        self,
        location: ExecutionLocation,
        command: MutableSequence[str],
        environment: MutableMapping[str, str] | None = None,
        workdir: str | None = None,
        stdin: int | str | None = None,
        stdout: int | str = STDOUT,
        stderr: int | str = STDOUT,
        capture_output: bool = False,
        timeout: int | None = None,
        job_name: str | None = None,
    ) -> tuple[str, int] | None:
        if job_name is None:
            return await super().run(location, command, environment, workdir, stdin, stdout, stderr, capture_output, timeout, job_name)
        job_command = utils.create_command(self.__class__.__name__, command, environment, workdir, stdin, stdout, stderr)
        script = render(self.template, job_command, self.variables)
        job_dir = workdir or "."
        job_id = await self._submit(location, script, job_name, job_dir, timeout)
        try:
            await self._wait(location, job_id)
        except asyncio.CancelledError:
            await self._cancel(location, [job_id])
            raise
        finally:
            self._jobs.pop(job_id, None)
        returncode = await self._exit_code(location, job_id)
        output = ""
        if stdout == STDOUT:
            output, _ = await self._shell(location, ["cat", shlex.quote(f"{job_dir}/.xffl-slurm-{job_id}.out"), "2>/dev/null", "||", "true"])
        return output.strip(), returncode

    async def _submit(self, location: ExecutionLocation, script: str, job_name: str, job_dir: str, timeout: int | None) -> str:
        encoded = base64.b64encode(script.encode()).decode()
        options = [
            "--parsable",
            f"--chdir={job_dir}",
            f"--output={job_dir}/.xffl-slurm-%j.out",
            f"--error={job_dir}/.xffl-slurm-%j.err",
            *self.flags,
        ]
        if "jobName" not in self.sbatch:
            options.append(f"--job-name={_slurm_job_name(job_name)}")
        if timeout:
            options.append(f"--time={utils.format_seconds_to_hhmmss(timeout)}")
        command = ["echo", encoded, "|", "base64", "-d", "|", "sbatch", *map(shlex.quote, options)]
        output, returncode = await self._shell(location, command)
        if returncode != 0:
            raise WorkflowExecutionException(f"deployment {self.deployment_name}: sbatch refused job {job_name}: {output.strip()}")
        job_id = output.strip().split(";")[0]
        if not job_id.isdigit():
            raise WorkflowExecutionException(f"deployment {self.deployment_name}: sbatch answered {output.strip()!r} for job {job_name}")
        self._jobs[job_id] = location
        if logger.isEnabledFor(logging.INFO):
            logger.info(f"Scheduled job {job_name} with job id {job_id} on {self.deployment_name}")
        return job_id

    async def _wait(self, location: ExecutionLocation, job_id: str) -> None:
        while True:
            await asyncio.sleep(self.pollingInterval)
            if job_id not in await self._active_jobs(location):
                return

    async def _active_jobs(self, location: ExecutionLocation) -> set[str]:
        """One squeue per polling interval for all of this facility's jobs."""
        async with self._poll_lock:
            if time.monotonic() - self._polled_at >= self.pollingInterval * 0.9 and self._jobs:
                output, returncode = await self._shell(location, ["squeue", "-h", "-o", "%i", "-t", ACTIVE_STATES, "-j", ",".join(self._jobs)])
                if returncode != 0 and "Invalid job id" not in output:
                    raise WorkflowExecutionException(f"deployment {self.deployment_name}: squeue failed: {output.strip()}")
                self._active = set(output.split()) if returncode == 0 else set()
                self._polled_at = time.monotonic()
            return set(self._active)

    async def _exit_code(self, location: ExecutionLocation, job_id: str) -> int:
        output, returncode = await self._shell(location, ["scontrol", "show", "-o", "job", job_id])
        if returncode != 0 or "ExitCode=" not in output:
            output, returncode = await self._shell(location, ["sacct", "-n", "-P", "-X", "-j", job_id, "-o", "State,ExitCode", "|", "sed", "'s/^\\([^|]*\\)|/JobState=\\1 ExitCode=/'"])
        state = re.search(r"JobState=(\S+)", output)
        code = re.search(r"ExitCode=(\d+):(\d+)", output)
        if code is None:
            raise WorkflowExecutionException(f"deployment {self.deployment_name}: cannot read the exit code of SLURM job {job_id}: {output.strip()[:200]}")
        exit_code, signal = int(code[1]), int(code[2])
        job_state = state[1] if state else "UNKNOWN"
        if exit_code == 0 and (signal or job_state.split()[0] in FAILED_STATES):
            logger.warning(f"SLURM job {job_id} on {self.deployment_name} ended {job_state} (signal {signal})")
            return 128 + signal if signal else 1
        return exit_code

    async def _cancel(self, location: ExecutionLocation, job_ids: list[str]) -> None:
        if job_ids:
            await self._shell(location, ["scancel", *job_ids])
            if logger.isEnabledFor(logging.INFO):
                logger.info(f"Cancelled SLURM jobs {', '.join(job_ids)} on {self.deployment_name}")

    async def undeploy(self, external: bool) -> None:
        """Cancel what is still queued or running (StreamFlow's own SLURM connector leaves it behind)."""
        if self._jobs:
            by_location: dict[str, tuple[ExecutionLocation, list[str]]] = {}
            for job_id, location in self._jobs.items():
                by_location.setdefault(location.name, (location, []))[1].append(job_id)
            for location, ids in by_location.values():
                try:
                    await self._cancel(location, ids)
                except Exception as exc:  # undeploy must go on: report and close the connections
                    logger.warning(f"could not cancel SLURM jobs {ids} on {self.deployment_name}: {exc}")
            self._jobs.clear()
        await super().undeploy(external)
