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

Copies of at least `fast_copy_min_bytes` to, from and between facilities keep StreamFlow's tar streams
and remote tar commands but are carried by the system OpenSSH client (staging.py says why and how);
smaller ones, and every copy where OpenSSH cannot log in as StreamFlow does, take StreamFlow's path.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import posixpath
import re
import shlex
import time
from collections.abc import Awaitable, Iterable, MutableMapping, MutableSequence
from importlib.resources import files
from pathlib import Path
from typing import Any, ClassVar

import asyncssh
from streamflow.core import utils
from streamflow.core.deployment import Connector, ExecutionLocation
from streamflow.core.exception import WorkflowDefinitionException, WorkflowExecutionException
from streamflow.core.scheduling import AvailableLocation
from streamflow.deployment.connector.base import copy_same_connector
from streamflow.deployment.connector.ssh import SSHConnector, SSHContext
from streamflow.log_handler import logger

from xffl_cwl.contract.facility import FacilityConfig, facility_problems
from xffl_cwl.contract.layout import DEADLINE_ENV, STATE_DIR_NAME, STATUS_FILE_ENV, STATUS_SUFFIX
from xffl_cwl.facility.ssh import Login, connect_options, explain
from xffl_cwl.facility.templates import TemplateError, effective_runtime, job_variables, load_template

from .staging import (
    FAST_COPY_MIN_BYTES,
    StagingError,
    local_size,
    local_tar_reader,
    local_tar_writer,
    openssh_command,
    remote_tar_reader,
    remote_tar_writer,
    run_pipeline,
)

STDOUT = asyncio.subprocess.STDOUT
ACTIVE_STATES = "PENDING,RUNNING,SUSPENDED,COMPLETING,CONFIGURING,RESIZING,REQUEUED,SIGNALING,STAGE_OUT"
CANCEL_SETTLE_SECONDS = 10
STALL_SECONDS = 120.0  # a copy in which nothing moves this long is killed (staging.run_pipeline)
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


TRANSIENT = ("timed out", "temporarily", "try again", "unable to contact", "connection refused", "busy")


def _transient(output: str) -> bool:
    """sbatch's words for a controller that is busy, not for a job that is wrong."""
    text = output.lower()
    return any(word in text for word in TRANSIENT)


def _seconds(value: str | None) -> float | None:
    try:
        seconds = float(value) if value else 0.0
    except ValueError:
        return None
    return seconds if seconds > 0 else None


SLURM_TIME = re.compile(r"\b(Submit|Start|End)Time=(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)\b")


def slurm_times(output: str) -> dict[str, float]:
    """{queued_s, ran_s} from scontrol's (or sacct's) Submit/Start/EndTime: differences of the
    facility's own clock, so its time zone does not matter; missing or unknown times give nothing."""
    from datetime import datetime

    found = {name: datetime.fromisoformat(value) for name, value in SLURM_TIME.findall(output)}
    times = {}
    if "Submit" in found and "Start" in found and found["Start"] >= found["Submit"]:
        times["queued_s"] = (found["Start"] - found["Submit"]).total_seconds()
    if "Start" in found and "End" in found and found["End"] >= found["Start"]:
        times["ran_s"] = (found["End"] - found["Start"]).total_seconds()
    return times


def _identity(command: MutableSequence[str], status_file: str) -> tuple[str, int]:
    """(facility, round) of a train job, from its own command line (the status file names the facility too)."""
    facility = status_file[: -len(STATUS_SUFFIX)] if status_file.endswith(STATUS_SUFFIX) else status_file
    round_number = 0
    words = [str(w) for w in command]
    for flag, i in ((w, i) for i, w in enumerate(words[:-1])):
        if flag == "--round" and words[i + 1].isdigit():
            round_number = int(words[i + 1])
        elif flag == "--facility":
            facility = words[i + 1]
    return facility, round_number


def _slurm_job_name(job_name: str, round_number: int = 0) -> str:
    """`/federation/train_leonardo/0.1` of round 2 -> `xffl-train_leonardo-0.1-round2`: squeue and sacct
    say which round a job trained, also across resumed runs (whose loop iterations count from 0 again)."""
    parts = [p for p in job_name.split("/") if p][-2:]
    name = "xffl-" + re.sub(r"[^A-Za-z0-9_.-]", "_", "-".join(parts))[:60]
    return f"{name}-round{round_number}" if round_number else name


async def _all(copies: Iterable[Awaitable[None]]) -> None:
    """Run copies together; when one fails or the caller is cancelled, the others are cancelled too."""
    tasks = [asyncio.ensure_future(c) for c in copies]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


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
        self._journal_path = Path(config_dir) / STATE_DIR_NAME / "jobs" / f"{deployment_name}.jsonl"
        self._poll_lock = asyncio.Lock()
        self._polled_at = float("-inf")
        self._active: set[str] = set()
        self._running: set[str] = set()  # jobs seen RUNNING, journaled once
        self.fast_copy_min_bytes = FAST_COPY_MIN_BYTES
        self.stall_seconds = STALL_SECONDS
        self._ssh: list[str] | bool | None = False  # not looked at yet
        self._gnu_tar: bool | None = None

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
        environment = environment or {}
        status_file = environment.get(STATUS_FILE_ENV)
        facility, round_number = _identity(command, status_file or "")
        slurm_name = _slurm_job_name(job_name, round_number)
        command_file = f"{job_dir}/.xffl-job-{slurm_name}.sh"
        script = self.job_script(command_file)
        deadline = _seconds(environment.get(DEADLINE_ENV))
        job_id = await self._submit(
            location, script, job_command, command_file, job_name, job_dir, timeout, round_number
        )
        submitted = time.monotonic()
        expired = False
        try:
            expired = await self._wait(location, job_id, submitted + deadline if deadline else None)
        except asyncio.CancelledError:
            await self._cancel(location, [job_id])
            raise
        finally:
            self._jobs.pop(job_id, None)
        state, returncode, times = await self._exit_code(location, job_id)
        self._running.discard(job_id)
        self._journal("ended", job_id=job_id, state=state, exit_code=returncode, **times)
        if status_file and (expired or returncode != 0):
            # The job keeps its own account of a failed round; when SLURM ended it (time limit, node failure,
            # the deadline) that account is missing or says less, so it is written here. The step succeeds.
            if expired:
                status, reason = (
                    "deadline",
                    f"SLURM job {job_id} did not end within the {deadline:g} s round deadline (queue wait included) "
                    f"and was cancelled (state {state})",
                )
            else:
                status, reason = "failed", f"SLURM job {job_id} ended {state} (exit code {returncode})"
            await self._write_status(
                location, f"{job_dir}/{status_file}", facility, round_number, status, reason, returncode
            )
            returncode = 0
        output = ""
        if stdout == STDOUT:
            output, _ = await self._retrying(
                location,
                ["cat", shlex.quote(f"{job_dir}/.xffl-slurm-{job_id}.out"), "2>/dev/null", "||", "true"],
                "read the job's output",
            )
        return output.strip(), returncode

    def job_script(self, command_file: str) -> str:
        """The batch script of a job whose command is in `command_file`.

        The command travels as a file, never inside the batch script: no value can close a quote or a
        here-document around it, and the template only ever runs `bash FILE` (inside its container).
        """
        return self.template.render(f"bash {shlex.quote(command_file)}", self.variables)

    def submission(
        self,
        script: str,
        job_command: str,
        command_file: str,
        job_name: str,
        job_dir: str,
        timeout: int | None,
        round_number: int = 0,
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
            options.append(f"--job-name={_slurm_job_name(job_name, round_number)}")
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
        round_number: int,
    ) -> str:
        command = self.submission(script, job_command, command_file, job_name, job_dir, timeout, round_number)
        output, returncode = await self._retrying(location, command, "submit the job")
        for delay in (5, 15, 45):  # a busy controller refuses for a while ("Socket timed out", ...)
            if returncode == 0 or not _transient(output):
                break
            logger.warning(
                f"deployment {self.deployment_name}: sbatch refused job {job_name} ({output.strip()[:200]}); trying again in {delay} s"
            )
            await asyncio.sleep(delay)
            output, returncode = await self._retrying(location, command, "submit the job")
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
        self._journal("submitted", job_id=job_id, job_name=job_name, workdir=job_dir, round=round_number)
        if logger.isEnabledFor(logging.INFO):
            logger.info(f"Scheduled job {job_name} with job id {job_id} on {self.deployment_name}")
        return job_id

    async def _retrying(self, location: ExecutionLocation, command: list[str], what: str) -> tuple[str, int]:
        """A login-node command, tried again with back-off while the facility cannot be reached."""
        delay = max(1.0, float(self.facility.retry_delay))
        started = time.monotonic()
        while True:
            try:
                return await self._shell(location, command)
            except (asyncio.CancelledError, KeyboardInterrupt):
                raise
            except Exception as exc:  # a dropped connection, a refused session: the facility may come back
                waited = time.monotonic() - started
                if waited + delay > self.facility.unreachable_timeout:
                    raise WorkflowExecutionException(
                        f"deployment {self.deployment_name}: could not {what} for {waited:.0f} s: {exc}"
                    ) from exc
                logger.warning(
                    f"deployment {self.deployment_name}: could not {what} ({exc}); trying again in {delay:.0f} s"
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 60.0)

    def _journal(self, event: str, **fields: Any) -> None:
        """Every job submitted and ended, in the run folder: what a killed orchestrator left can be found."""
        try:
            self._journal_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self._journal_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"event": event, "at": time.time(), **fields}) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            logger.warning(f"deployment {self.deployment_name}: cannot write the job journal: {exc}")

    async def _write_status(
        self,
        location: ExecutionLocation,
        path: str,
        facility: str,
        round_number: int,
        status: str,
        reason: str,
        code: int,
    ) -> None:
        record = {"format": "xffl-train-status", "version": 1, "facility": facility, "round": round_number}
        record |= {"status": status, "reason": reason, "seconds": None, "exit_code": code}
        encoded = base64.b64encode(json.dumps(record).encode()).decode()
        await self._retrying(
            location, ["echo", encoded, "|", "base64", "-d", ">", shlex.quote(path)], "write the job's status"
        )
        logger.warning(f"facility {self.deployment_name} is left out of round {round_number}: {reason}")

    async def _wait(self, location: ExecutionLocation, job_id: str, deadline_at: float | None) -> bool:
        """Until the job leaves the queue; True if it was cancelled because it passed its deadline."""
        while True:
            await asyncio.sleep(self.pollingInterval)
            if deadline_at is not None and time.monotonic() > deadline_at:
                await self._cancel(location, [job_id])
                settle_by = time.monotonic() + CANCEL_SETTLE_SECONDS  # a dead node holds it COMPLETING
                while job_id in await self._active_jobs(location) and time.monotonic() < settle_by:
                    await asyncio.sleep(self.pollingInterval)
                return True
            if job_id not in await self._active_jobs(location):
                return False

    async def _active_jobs(self, location: ExecutionLocation) -> set[str]:
        """One squeue per polling interval for all of this facility's jobs (a dropped connection is retried)."""
        async with self._poll_lock:
            if time.monotonic() - self._polled_at >= self.pollingInterval * 0.9 and self._jobs:
                ids = ",".join(self._jobs)
                output, returncode = await self._retrying(
                    location, ["squeue", "-h", "-o", "'%i %T'", "-t", ACTIVE_STATES, "-j", ids], "poll the queue"
                )
                if returncode != 0 and "Invalid job id" not in output:
                    raise WorkflowExecutionException(
                        f"deployment {self.deployment_name}: squeue failed: {output.strip()}"
                    )
                states = dict(line.split()[:2] for line in output.splitlines() if len(line.split()) >= 2)
                self._active = set(states) if returncode == 0 else set()
                for job_id, job_state in states.items():
                    if job_state == "RUNNING" and job_id in self._jobs and job_id not in self._running:
                        self._running.add(job_id)
                        self._journal("started", job_id=job_id)  # the queue wait ends: `xffl-cwl status` shows it
                self._polled_at = time.monotonic()
            return set(self._active)

    async def _exit_code(self, location: ExecutionLocation, job_id: str) -> tuple[str, int, dict[str, float]]:
        """(SLURM state, exit code, {queued_s, ran_s}); a job SLURM ended (timeout, node failure, ...) never
        reads as 0. The times are SLURM's own (submit to start, start to end), for `xffl-cwl report`."""
        output, returncode = await self._retrying(
            location, ["scontrol", "show", "-o", "job", job_id], "read the job's state"
        )
        if returncode != 0 or "ExitCode=" not in output:
            output, returncode = await self._retrying(
                location,
                [
                    "sacct",
                    "-n",
                    "-P",
                    "-X",
                    "-j",
                    job_id,
                    "-o",
                    "State,ExitCode,Submit,Start,End",
                    "|",
                    "sed",
                    "'s/^\\([^|]*\\)|\\([^|]*\\)|\\([^|]*\\)|\\([^|]*\\)|/JobState=\\1 ExitCode=\\2 SubmitTime=\\3 StartTime=\\4 EndTime=/'",
                ],
                "read the job's state",
            )
        state = re.search(r"JobState=(\S+)", output)
        code = re.search(r"ExitCode=(\d+):(\d+)", output)
        if code is None:
            raise WorkflowExecutionException(
                f"deployment {self.deployment_name}: cannot read the exit code of SLURM job {job_id}: {output.strip()[:200]}"
            )
        exit_code, signal = int(code[1]), int(code[2])
        job_state = state[1].split()[0] if state else "UNKNOWN"
        times = slurm_times(output)
        if exit_code == 0 and (signal or job_state in FAILED_STATES):
            logger.warning(f"SLURM job {job_id} on {self.deployment_name} ended {job_state} (signal {signal})")
            return job_state, 128 + signal if signal else 1, times
        return job_state, exit_code, times

    async def _cancel(self, location: ExecutionLocation, job_ids: list[str]) -> None:
        if job_ids:
            await self._shell(location, ["scancel", *job_ids])
            self._journal("cancelled", job_ids=list(job_ids))
            if logger.isEnabledFor(logging.INFO):
                logger.info(f"Cancelled SLURM jobs {', '.join(job_ids)} on {self.deployment_name}")

    def openssh(self) -> list[str] | None:
        """The `ssh` command line of this facility's login, or None where copies keep StreamFlow's path."""
        if self._ssh is False:
            self._ssh = openssh_command(self.login)
            if self._ssh is None:
                logger.info(f"deployment {self.deployment_name}: copies go through StreamFlow's SSH channel")
        return self._ssh or None

    async def gnu_tar(self, location: ExecutionLocation) -> bool:
        """The login node's tar is GNU tar (then copies use 1 MiB tar records); asked once."""
        if self._gnu_tar is None:
            output, status = await self._shell(location, ["tar --version 2>/dev/null | head -n 1"])
            self._gnu_tar = status == 0 and "GNU tar" in output
        return self._gnu_tar

    def _where(self) -> str:
        return f"deployment {self.deployment_name} ({self.login.username}@{self.login.host}:{self.login.port})"

    async def _staged(self, commands: list[tuple[str, list[str]]], what: str) -> None:
        """One copy pipeline; tried again with back-off while the login node cannot be reached."""
        delay = max(1.0, float(self.facility.retry_delay))
        started = time.monotonic()
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(f"{self._where()}: copy {what} through OpenSSH: {' | '.join(c[0] for c in commands)}")
        while True:
            try:
                await run_pipeline(commands, self.stall_seconds)
                return
            except (StagingError, OSError) as exc:
                waited = time.monotonic() - started
                if not getattr(exc, "transient", False) or waited + delay > self.facility.unreachable_timeout:
                    raise WorkflowExecutionException(f"{self._where()}: cannot copy {what}: {exc}") from exc
                logger.warning(f"{self._where()}: copy {what} failed ({exc}); trying again in {delay:.0f} s")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 60.0)

    async def _remote_kind(self, location: ExecutionLocation, path: str) -> tuple[bool, int]:
        """(is a directory, bytes) of a path on the facility, symlinks followed as `tar chf` does."""
        quoted = shlex.quote(path)
        output, status = await self._shell(
            location, [f"{{ du -skL -- {quoted} && if [ -d {quoted} ]; then echo dir; else echo file; fi; }}"]
        )
        lines = output.strip().splitlines()
        if status != 0 or len(lines) < 2 or not lines[-2].split()[0].isdigit():
            raise WorkflowExecutionException(f"{self._where()}: cannot read {path}: {output.strip()[-300:]}")
        return lines[-1] == "dir", int(lines[-2].split()[0]) * 1024

    async def copy_local_to_remote(
        self, src: str, dst: str, locations: MutableSequence[ExecutionLocation], read_only: bool = False
    ) -> None:
        """StreamFlow's copy (the destination it chooses, its tar stream and `tar xpf - -C /`) over OpenSSH."""
        ssh = self.openssh()
        if ssh is None or local_size(src, self.fast_copy_min_bytes) < self.fast_copy_min_bytes:
            await super().copy_local_to_remote(src, dst, locations, read_only)
            return
        dst = await utils.get_local_to_remote_destination(self, locations[0], src, dst)
        large = await self.gnu_tar(locations[0])

        async def one(location: ExecutionLocation) -> None:
            where = f"from {src} on local file-system to {dst} on location {location}"
            logger.info(f"COPYING {where}")
            commands = [("tar", local_tar_reader(src, dst, large)), ("ssh", [*ssh, remote_tar_writer(large)])]
            await self._staged(commands, f"{src} to {dst}")
            logger.info(f"COMPLETED copy {where}")

        await _all(one(location) for location in locations)

    async def copy_remote_to_local(
        self, src: str, dst: str, location: ExecutionLocation, read_only: bool = False
    ) -> None:
        """StreamFlow's copy back (`tar chf` on the facility, extracted where its tar path puts it) over OpenSSH.

        A file lands in `dst`, or in `dst/<name>` when `dst` is a directory; a directory's content lands
        in `dst`, merged with what is there (StreamFlow's extraction; it also leaves an empty `dst/<name>`
        when `dst` already is a directory, which this copy does not)."""
        ssh = self.openssh()
        if ssh is None:
            await super().copy_remote_to_local(src, dst, location, read_only)
            return
        src = posixpath.normpath(src)
        is_dir, size = await self._remote_kind(location, src)
        if size < self.fast_copy_min_bytes:
            await super().copy_remote_to_local(src, dst, location, read_only)
            return
        name = posixpath.basename(src)
        target = os.path.join(dst, name) if not is_dir and os.path.isdir(dst) else dst
        large = await self.gnu_tar(location)
        where = f"from {src} on location {location} to {dst} on local file-system"
        logger.info(f"COPYING {where}")
        commands = [("ssh", [*ssh, remote_tar_reader(src, large)]), ("tar", local_tar_writer(name, target, large))]
        await self._staged(commands, f"{src} to {dst}")
        logger.info(f"COMPLETED copy {where}")

    async def copy_remote_to_remote(
        self,
        src: str,
        dst: str,
        locations: MutableSequence[ExecutionLocation],
        source_location: ExecutionLocation,
        source_connector: Connector | None = None,
        read_only: bool = False,
    ) -> None:
        """Between two facilities: StreamFlow's reader and writer commands, the bytes relayed by two `ssh`
        processes here instead of through Python; one pipeline per destination location, in parallel."""
        source = source_connector or self
        ssh = self.openssh()
        source_ssh = source.openssh() if isinstance(source, XfflFacilityConnector) else None
        if ssh is None or source_ssh is None:
            await super().copy_remote_to_remote(src, dst, locations, source_location, source_connector, read_only)
            return
        locations = await copy_same_connector(self, locations, source_location, src, dst, read_only)
        if not locations:
            return
        src = posixpath.normpath(src)
        _, size = await source._remote_kind(source_location, src)
        if size < self.fast_copy_min_bytes:
            await super().copy_remote_to_remote(src, dst, locations, source_location, source_connector, read_only)
            return
        writer = await utils.get_remote_to_remote_write_command(
            src_connector=source,
            src_location=source_location,
            src=src,
            dst_connector=self,
            dst_locations=locations,
            dst=dst,
        )
        reader = remote_tar_reader(src, await source.gnu_tar(source_location))

        async def one(location: ExecutionLocation) -> None:
            where = f"from {src} on location {source_location} to {dst} on location {location}"
            logger.info(f"COPYING {where}")
            commands = [(f"ssh {source.deployment_name}", [*source_ssh, reader]), ("ssh", [*ssh, " ".join(writer)])]
            await self._staged(commands, f"{src} on {source.deployment_name} to {dst}")
            logger.info(f"COMPLETED copy {where}")

        await _all(one(location) for location in locations)

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
