"""Fast staging for `xffl-facility`: StreamFlow's tar streams, carried by the system OpenSSH client.

StreamFlow 0.2.0rc3 copies to and from an SSH deployment by writing a tar stream, built or read in
Python (aiotarstream, `transferBufferSize` bytes at a time, blocking file reads and writes inside the
event loop), through an asyncssh channel framed in Python 32 KiB at a time. All copies of a run share
that one thread: measured, ~2 CPU seconds of it per GiB, and 0.45-0.8x the speed of `scp` to a
facility for 1 GiB (benchmarks/staging.py).

Here the same tar streams (GNU format, symlinks followed, modes kept, the same remote `tar` commands
StreamFlow runs) flow between a local GNU tar and an `ssh` process: C moves and encrypts the bytes,
each copy is its own processes and its own TCP connection, so copies run in parallel across facilities
and cores and the orchestrator's thread stays free. Where the facility's tar is GNU tar both ends use
1 MiB records (`-b 2048`), and pipes are 1 MiB: tar's default 10 KiB reads and writes cost more CPU
than the encryption on the test machine. The login is the one StreamFlow makes (user, port, key,
known_hosts, cipher preference, no compression); where OpenSSH cannot log in the same way (a password
or key passphrase file, which BatchMode cannot use) the connector keeps StreamFlow's own copy.

Every process of a copy is in its own process group, killed on cancellation and on any error; a copy
in which nothing moves for `stall_seconds` is killed as well, so no wait is unbounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import posixpath
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from xffl_cwl.facility.ssh import ENCRYPTION_ALGS, Login

# Below this size a copy goes through StreamFlow's own, already open channel: a fresh OpenSSH login
# costs ~0.2 s (measured on loopback), more than StreamFlow's whole copy of 64 MiB there. Above it,
# StreamFlow's copy costs the orchestrator's one Python thread ~2 CPU seconds per GiB (measured).
FAST_COPY_MIN_BYTES = 64 * 2**20
# A copy that moves less than this in `stall_seconds` is stuck (ssh keep-alives are ~100 bytes).
STALL_BYTES = 64 * 1024
# tar records of 1 MiB (where both ends run GNU tar) and pipes as large as Linux lets a user make them
LARGE_RECORD = ["-b", "2048"]
PIPE_BYTES = 2**20
KEEPALIVE_SECONDS = 15
STDERR_HEAD = 4000
KILL_WAIT_SECONDS = 10.0
# ssh's words for a link that failed, as opposed to a login that is refused (never retried).
TRANSIENT_SSH = (
    "connection refused",
    "connection reset",
    "connection closed",
    "closed by remote host",
    "connection timed out",
    "timed out",
    "broken pipe",
    "no route to host",
    "network is unreachable",
    "not responding",
    "kex_exchange_identification",
    "connection lost",
)
DEFAULT_KEYS = ("id_ed25519_sk", "id_ecdsa_sk", "id_ed448", "id_ed25519", "id_ecdsa", "id_rsa", "id_dsa")


class StagingError(Exception):
    """A copy that failed; `transient` when ssh lost or could not reach the login node."""

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


@cache
def gnu_tar() -> bool:
    """The local tar is GNU tar (needed for --transform and member selection)."""
    try:
        out = subprocess.run(["tar", "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return "GNU tar" in out


def openssh_command(login: Login) -> list[str] | None:
    """`ssh` with the login StreamFlow's connector makes, or None where OpenSSH cannot make it unattended.

    Kept equal to facility/ssh.connect_options: the same user, port, key, known_hosts file (and the
    same default ones when none is configured), host key checking, cipher preference, no compression.
    """
    if login.password_file is not None or login.passphrase_file is not None:
        return None
    if shutil.which("ssh") is None or not gnu_tar():
        return None
    home_ssh = Path(os.path.expanduser("~/.ssh"))  # asyncssh reads $HOME; OpenSSH the passwd entry's home
    config = home_ssh / "config"
    command = ["ssh", "-F", str(config) if config.is_file() else "/dev/null"]
    keys = [login.key] if login.key else [home_ssh / name for name in DEFAULT_KEYS if (home_ssh / name).is_file()]
    for key in keys:
        command += ["-i", str(key)]
    if login.key:
        command += ["-o", "IdentitiesOnly=yes"]
    if login.check_host_key:
        known_hosts = login.known_hosts or home_ssh / "known_hosts"
        command += ["-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={known_hosts}"]
        if login.known_hosts:
            command += ["-o", "GlobalKnownHostsFile=/dev/null"]
    else:
        command += ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"]
        command += ["-o", "GlobalKnownHostsFile=/dev/null"]
    for option in (
        "BatchMode=yes",
        "UpdateHostKeys=no",
        "Compression=no",
        f"Ciphers={','.join(ENCRYPTION_ALGS)}",
        f"ConnectTimeout={login.connect_timeout}",
        f"ServerAliveInterval={KEEPALIVE_SECONDS}",
        "ServerAliveCountMax=4",
        "ControlMaster=no",
        "ControlPath=none",
        "ClearAllForwardings=yes",
        "ForwardAgent=no",
        "ForwardX11=no",
        "PermitLocalCommand=no",
        "RequestTTY=no",
        "LogLevel=ERROR",
    ):
        command += ["-o", option]
    return [*command, "-p", str(login.port), "-l", login.username, "--", login.host]


def _delimiter(*texts: str) -> str:
    for candidate in ",|#%@:;!~\x01":
        if not any(candidate in text for text in texts):
            return candidate
    raise StagingError(f"cannot rename {texts[0]!r} to {texts[1]!r} in a tar stream")


def rename_expression(name: str, new_name: str) -> str:
    """A GNU tar --transform expression that renames the member `name` (and all under it) to `new_name`."""
    delimiter = _delimiter(name, new_name)
    pattern = "".join("\\" + c if c in ".[]*^$\\" else c for c in name)
    replacement = "".join("\\" + c if c in "\\&" else c for c in new_name)
    return f"s{delimiter}^{pattern}{delimiter}{replacement}{delimiter}"


def local_tar_reader(src: str, arcname: str, large_records: bool = False) -> list[str]:
    """The tar stream StreamFlow writes for a local `src` (aiotarstream: GNU format, symlinks followed),
    with `src` named `arcname` (StreamFlow's arcname is the remote destination, extracted under /)."""
    src = os.path.normpath(os.path.abspath(src))
    parent, name = os.path.split(src)
    rename = f"--transform={rename_expression(name, arcname.lstrip('/') or '.')}"
    records = LARGE_RECORD if large_records else []
    return ["tar", "-c", "-h", "--format=gnu", *records, "-f", "-", rename, "-C", parent or "/", "--", name]


def local_tar_writer(name: str, dst: str, large_records: bool = False) -> list[str]:
    """Extract member `name` (and what is under it) of a tar stream to the local path `dst`, modes kept,
    owned by whoever runs the orchestrator (as StreamFlow's extraction leaves files); any other member,
    which StreamFlow's reader never sends, is ignored instead of landing elsewhere on this machine."""
    dst = os.path.normpath(os.path.abspath(dst)).lstrip("/") or "."
    rename = f"--transform={rename_expression(name, dst)}"
    records = LARGE_RECORD if large_records else []
    return ["tar", "-x", "-p", "--no-same-owner", *records, "-f", "-", "-C", "/", rename, "--", name]


def remote_tar_reader(path: str, large_records: bool = False) -> str:
    """StreamFlow's reader command on a facility (`tar chf - -C DIR NAME`), its words quoted."""
    parent, name = posixpath.split(posixpath.normpath(path))
    records = " -b 2048" if large_records else ""
    return f"tar chf -{records} -C {shlex.quote(parent or '/')} {shlex.quote(name)}"


def remote_tar_writer(large_records: bool = False) -> str:
    """StreamFlow's writer command for a copy from here (`tar xpf - -C /`: the stream names full paths)."""
    return "tar xpf - -b 2048 -C /" if large_records else "tar xpf - -C /"


def _pipe() -> tuple[int, int]:
    read_end, write_end = os.pipe()
    with contextlib.suppress(OSError, AttributeError):  # F_SETPIPE_SZ: Linux only; capped by pipe-max-size
        fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    return read_end, write_end


def local_size(path: str, limit: int) -> int:
    """Bytes under a local path, symlinks followed as tar -h does; counting stops past `limit`."""
    total = 0
    try:
        if not os.path.isdir(path):
            return os.stat(path).st_size
        for root, _dirs, names in os.walk(path, followlinks=True):
            for name in names:
                with contextlib.suppress(OSError):
                    total += os.stat(os.path.join(root, name)).st_size
                if total > limit:
                    return total
    except OSError:
        return 0  # let StreamFlow's own copy report what is wrong with the path
    return total


def _io_bytes(pid: int) -> int | None:
    """Bytes a process has read and written so far (Linux); None where it cannot be known."""
    try:
        fields = dict(line.split(": ", 1) for line in Path(f"/proc/{pid}/io").read_text().splitlines())
        return int(fields["rchar"]) + int(fields["wchar"])
    except (OSError, KeyError, ValueError):
        return None


@dataclass
class _Stage:
    name: str
    process: asyncio.subprocess.Process
    stderr: bytearray = field(default_factory=bytearray)  # its first STDERR_HEAD bytes: the first error says why
    dropped_lines: int = 0
    reader: asyncio.Task | None = None


async def _collect(stage: _Stage) -> None:
    assert stage.process.stderr is not None
    while chunk := await stage.process.stderr.read(65536):
        room = max(0, STDERR_HEAD - len(stage.stderr))
        stage.stderr += chunk[:room]
        stage.dropped_lines += chunk[room:].count(b"\n")


def _kill(stages: Sequence[_Stage]) -> None:
    for stage in stages:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(stage.process.pid, signal.SIGKILL)


async def run_pipeline(commands: Sequence[tuple[str, list[str]]], stall_seconds: float) -> None:
    """Run `name, argv` commands as a shell pipeline would, each in its own process group.

    Raises StagingError naming the stage that failed and its first error line. On any
    exception, cancellation included, every process is killed and reaped before this returns.
    """
    stages: list[_Stage] = []
    previous: int | None = None
    try:
        for i, (name, argv) in enumerate(commands):
            last = i == len(commands) - 1
            read_end, write_end = (None, None) if last else _pipe()
            try:
                process = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=previous if previous is not None else subprocess.DEVNULL,
                    stdout=write_end if write_end is not None else subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    start_new_session=True,
                )
            finally:
                for fd in (previous, write_end):
                    if fd is not None:
                        os.close(fd)
                previous = read_end
            stage = _Stage(name, process)
            stage.reader = asyncio.create_task(_collect(stage))
            stages.append(stage)
        await _wait(stages, stall_seconds)
    except BaseException:
        _kill(stages)
        raise
    finally:
        if previous is not None:
            os.close(previous)
        _kill([s for s in stages if s.process.returncode is None])
        for stage in stages:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError, ProcessLookupError):
                await asyncio.wait_for(asyncio.shield(stage.process.wait()), KILL_WAIT_SECONDS)
            if stage.reader is not None:
                stage.reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await stage.reader
    failed = [
        s
        for i, s in enumerate(stages)
        if s.process.returncode != 0
        and not (_broken_pipe(s) and all(t.process.returncode == 0 for t in stages[i + 1 :]))
    ]
    if failed:
        # the stage that reports a reason, not the one that only saw its pipe close
        failed.sort(key=lambda s: (_broken_pipe(s), not s.stderr.strip()))
        stage = failed[0]
        lines = [
            line.strip()
            for line in bytes(stage.stderr).decode(errors="replace").splitlines()
            if line.strip() and "Exiting with failure status" not in line and "Error is not recoverable" not in line
        ]
        reason = lines[0] if lines else f"exit code {stage.process.returncode}"
        if len(lines) - 1 + stage.dropped_lines > 0:
            reason += f" (and {len(lines) - 1 + stage.dropped_lines} more lines)"
        transient = any(
            s.name.startswith("ssh")
            and s.process.returncode == 255
            and any(w in bytes(s.stderr).decode(errors="replace").lower() for w in TRANSIENT_SSH)
            for s in stages
        )
        raise StagingError(f"{stage.name}: {reason}", transient)


def _broken_pipe(stage: _Stage) -> bool:
    """The stage stopped because the next one had read all it needed (a tar reader stops at the end marker)."""
    code = stage.process.returncode
    return code == -signal.SIGPIPE or (code != 0 and b"broken pipe" in bytes(stage.stderr).lower())


async def _wait(stages: Sequence[_Stage], stall_seconds: float) -> None:
    """Until every stage has ended; a pipeline that moves less than STALL_BYTES in `stall_seconds` is killed."""
    waits = [asyncio.ensure_future(s.process.wait()) for s in stages]
    try:
        seen: tuple[int, int] | None = None
        progressed_at = time.monotonic()
        while not all(w.done() for w in waits):
            await asyncio.wait(waits, timeout=min(1.0, stall_seconds))
            ended = sum(w.done() for w in waits)
            counts = [_io_bytes(s.process.pid) for s, w in zip(stages, waits, strict=True) if not w.done()]
            moved = sum(c for c in counts if c is not None)
            unknown = bool(counts) and all(c is None for c in counts)  # no /proc: ServerAlive bounds a dead link
            if seen is None or unknown or ended != seen[0] or moved - seen[1] >= STALL_BYTES:
                seen, progressed_at = (ended, moved), time.monotonic()
            elif time.monotonic() - progressed_at > stall_seconds:
                raise StagingError(f"nothing moved for {stall_seconds:g} s")
    finally:
        for w in waits:
            w.cancel()
