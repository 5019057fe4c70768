"""`xffl-facility`: an SSH deployment whose jobs are SLURM batch jobs.

The connector *is* the SSH connector of the login node, so StreamFlow stages data through it as
for any SSH deployment. Only job runs differ: the command is rendered into the facility's
batch template (a preset from slurm/ or the user's file), submitted with sbatch over SSH,
polled with squeue, and its exit code read back with scontrol (sacct if the job has left the
controller's memory). Jobs still queued or running are cancelled when the deployment is undeployed
or the step is cancelled, so a failed or interrupted run leaves nothing behind on the cluster
(StreamFlow's own QueueManagerConnector does the same for its jobs; this connector is not one,
because in 0.2.0rc3 a queue manager wrapping an SSH connector fails at its first job).

StreamFlow private names this module touches (0.2.0rc3 is pinned; tests/test_plugin.py checks
each still exists with the meaning used here):
- `SSHConnector._cls_context`: the SSHContext class its connections come from;
- `SSHContext._get_connection(config)`: overridden to add the facility's known_hosts file, which
  StreamFlow cannot be given, to StreamFlow's own connection options (see facility/ssh.py).
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
from typing import Any, ClassVar

import asyncssh
from streamflow.core import utils
from streamflow.core.deployment import ExecutionLocation
from streamflow.core.exception import WorkflowDefinitionException, WorkflowExecutionException
from streamflow.core.scheduling import AvailableLocation
from streamflow.deployment.connector.ssh import SSHConnector, SSHContext
from streamflow.log_handler import logger

from xffl_cwl.contract.facility import FacilityConfig, facility_problems
from xffl_cwl.facility.ssh import Login, connect_options, explain
from xffl_cwl.facility.templates import TemplateError, effective_runtime, job_variables, load_template

STDOUT = asyncio.subprocess.STDOUT
ACTIVE_STATES = "PENDING,RUNNING,SUSPENDED,COMPLETING,CONFIGURING,RESIZING,REQUEUED,SIGNALING,STAGE_OUT"
FAILED_STATES = ("TIMEOUT", "CANCELLED", "NODE_FAIL", "OUT_OF_MEMORY", "FAILED", "BOOT_FAIL", "DEADLINE", "PREEMPTED")


class FacilitySSHContext(SSHContext):
    """StreamFlow's SSH context, logging in with xffl-cwl's options (StreamFlow's plus known_hosts)."""

    login: ClassVar[Login]

    async def _get_connection(self, config):  # type: ignore[override]
        if config is None:
            return None
        options = connect_options(self.login, client_keys=config.client_keys, timeout=config.connect_timeout)
        return await asyncssh.connect(**options, tunnel=await self._get_connection(config.tunnel))


def _context_class(login: Login) -> type[SSHContext]:
    return type("FacilitySSHContext", (FacilitySSHContext,), {"login": login})


def _slurm_job_name(job_name: str) -> str:
    """`/federation/train_leonardo/0.1` -> `xffl-train_leonardo-0.1`: readable in squeue and sacct."""
    parts = [p for p in job_name.split("/") if p][-2:]
    return "xffl-" + re.sub(r"[^A-Za-z0-9_.-]", "_", "-".join(parts))[:60]


class XfflFacilityConnector(SSHConnector):
    def __init__(self, deployment_name: str, config_dir: str, **config: Any) -> None:
        def fail(problem: str) -> WorkflowDefinitionException:
            return WorkflowDefinitionException(f"deployment {deployment_name}: {problem}")

        try:
            facility = FacilityConfig.from_streamflow(config)
        except (TypeError, ValueError) as exc:
            raise fail(str(exc)) from exc
        for key, problem in facility_problems(facility):
            raise fail(f"{key}: {problem}")
        login = Login.of(facility, config_dir)
        problem = login.missing_file()
        if problem is not None:
            raise fail(f"{problem.detail}; fix the path in streamflow.yml")
        super().__init__(
            deployment_name=deployment_name,
            config_dir=config_dir,
            nodes=[f"{facility.host}:{facility.port}"],
            username=facility.username,
            checkHostKey=facility.check_host_key,
            connectTimeout=facility.connect_timeout,
            maxConcurrentSessions=facility.max_concurrent_sessions,
            retries=facility.retries,
            retryDelay=facility.retry_delay,
            sshKey=None if login.key is None else str(login.key),
            sshKeyPassphraseFile=None if login.passphrase_file is None else str(login.passphrase_file),
            passwordFile=None if login.password_file is None else str(login.password_file),
            transferBufferSize=facility.transfer_buffer_size,
        )
        self._cls_context = _context_class(login)
        self.facility = facility
        self.login = login
        try:
            self.template = load_template(facility.template, Path(config_dir))
        except TemplateError as exc:
            raise fail(str(exc)) from exc
        runtime = effective_runtime(self.template, facility.container)
        if runtime != "none" and not facility.container.image:
            raise fail(
                f"jobs run in {runtime} (template {facility.template}) but container.image is not set; "
                "give the image's path on the facility, or set container.runtime: none"
            )
        self.variables = job_variables(facility.sbatch, facility.container, facility.setup)
        self.flags = facility.sbatch.flags()
        self.maxConcurrentJobs = facility.max_concurrent_jobs
        self.pollingInterval = facility.polling_interval
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
        try:
            connection = await self._cls_context(self.config_dir, node, 1)._get_connection(node)
            connection.close()
        except Exception as exc:  # every way a login fails becomes one sentence
            raise WorkflowDefinitionException(f"deployment {self.deployment_name}: {explain(exc, self.login)}") from exc

    async def get_available_locations(self, service: str | None = None) -> MutableMapping[str, AvailableLocation]:
        """The login node, with one slot per job the facility may have queued at once (no local hardware limits)."""
        return {
            name: AvailableLocation(
                name=name, deployment=self.deployment_name, hostname=name, service=service, slots=self.maxConcurrentJobs
            )
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
            return await super().run(
                location, command, environment, workdir, stdin, stdout, stderr, capture_output, timeout, job_name
            )
        job_command = utils.create_command(
            self.__class__.__name__, command, environment, workdir, stdin, stdout, stderr
        )
        job_dir = workdir or "."
        command_file = f"{job_dir}/.xffl-job-{_slurm_job_name(job_name)}.sh"
        script = self.job_script(command_file)
        job_id = await self._submit(location, script, job_command, command_file, job_name, job_dir, timeout)
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
            output, _ = await self._shell(
                location, ["cat", shlex.quote(f"{job_dir}/.xffl-slurm-{job_id}.out"), "2>/dev/null", "||", "true"]
            )
        return output.strip(), returncode

    def job_script(self, command_file: str) -> str:
        """The batch script of a job whose command is in `command_file`.

        The command travels as a file, never inside the batch script: no value can close a quote or a
        here-document around it, and the template only ever runs `bash FILE` (inside its container).
        """
        return self.template.render(f"bash {shlex.quote(command_file)}", self.variables)

    def submission(
        self, script: str, job_command: str, command_file: str, job_name: str, job_dir: str, timeout: int | None
    ) -> list[str]:
        """The login-node shell command that writes the command file and submits the script: only
        base64 text and shell-quoted words, so no part of either can act on the login node."""
        encoded = base64.b64encode(script.encode()).decode()
        encoded_command = base64.b64encode(job_command.encode()).decode()
        options = [
            "--parsable",
            f"--chdir={job_dir}",
            f"--output={job_dir}/.xffl-slurm-%j.out",
            f"--error={job_dir}/.xffl-slurm-%j.err",
            *self.flags,
        ]
        if self.facility.sbatch.job_name is None:
            options.append(f"--job-name={_slurm_job_name(job_name)}")
        if timeout:
            options.append(f"--time={utils.format_seconds_to_hhmmss(timeout)}")
        return [
            *("mkdir", "-p", shlex.quote(job_dir), "&&"),
            *("echo", encoded_command, "|", "base64", "-d", ">", shlex.quote(command_file), "&&"),
            *("echo", encoded, "|", "base64", "-d", "|", "sbatch", *map(shlex.quote, options)),
        ]

    async def _submit(
        self,
        location: ExecutionLocation,
        script: str,
        job_command: str,
        command_file: str,
        job_name: str,
        job_dir: str,
        timeout: int | None,
    ) -> str:
        command = self.submission(script, job_command, command_file, job_name, job_dir, timeout)
        output, returncode = await self._shell(location, command)
        if returncode != 0:
            raise WorkflowExecutionException(
                f"deployment {self.deployment_name}: sbatch refused job {job_name}: {output.strip()}"
            )
        job_id = output.strip().split(";")[0]
        if not job_id.isdigit():
            raise WorkflowExecutionException(
                f"deployment {self.deployment_name}: sbatch answered {output.strip()!r} for job {job_name}"
            )
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
                output, returncode = await self._shell(
                    location, ["squeue", "-h", "-o", "%i", "-t", ACTIVE_STATES, "-j", ",".join(self._jobs)]
                )
                if returncode != 0 and "Invalid job id" not in output:
                    raise WorkflowExecutionException(
                        f"deployment {self.deployment_name}: squeue failed: {output.strip()}"
                    )
                self._active = set(output.split()) if returncode == 0 else set()
                self._polled_at = time.monotonic()
            return set(self._active)

    async def _exit_code(self, location: ExecutionLocation, job_id: str) -> int:
        output, returncode = await self._shell(location, ["scontrol", "show", "-o", "job", job_id])
        if returncode != 0 or "ExitCode=" not in output:
            output, returncode = await self._shell(
                location,
                [
                    "sacct",
                    "-n",
                    "-P",
                    "-X",
                    "-j",
                    job_id,
                    "-o",
                    "State,ExitCode",
                    "|",
                    "sed",
                    "'s/^\\([^|]*\\)|/JobState=\\1 ExitCode=/'",
                ],
            )
        state = re.search(r"JobState=(\S+)", output)
        code = re.search(r"ExitCode=(\d+):(\d+)", output)
        if code is None:
            raise WorkflowExecutionException(
                f"deployment {self.deployment_name}: cannot read the exit code of SLURM job {job_id}: {output.strip()[:200]}"
            )
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
        """Cancel what is still queued or running, then close the connections."""
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
