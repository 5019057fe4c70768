"""Logging in to a facility's login node: one set of options and one reading of what went wrong,
shared by preflight (`xffl-cwl check`/`run`) and the `xffl-facility` StreamFlow plugin.

The options are StreamFlow's own (its SSH connector's cipher preference, passphrase and password
files) plus the facility's known_hosts file, which StreamFlow's connector cannot be given.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xffl_cwl.contract.facility import FacilityConfig

# The ciphers StreamFlow 0.2.0rc3's SSHContext offers, in its order (AES-GCM first: the fastest for
# model transfers). tests/test_plugin.py holds this to StreamFlow's source, so a new pin is noticed.
ENCRYPTION_ALGS = ("aes128-gcm@openssh.com", "aes256-ctr", "aes192-ctr", "aes128-ctr")
DEFAULT_KNOWN_HOSTS = "~/.ssh/known_hosts"


def resolve(path: str | None, base_dir: Path | str) -> Path | None:
    """A configured file path: `~` expanded, relative ones against the configuration's folder."""
    if path is None:
        return None
    candidate = Path(path).expanduser()
    return candidate if candidate.is_absolute() else (Path(base_dir) / candidate).resolve()


def _secret(path: Path | None) -> str | None:
    return None if path is None else path.read_text(encoding="utf-8").strip()


@dataclass(frozen=True)
class Login:
    """Everything needed to open an SSH connection to one login node."""

    host: str
    port: int
    username: str
    key: Path | None
    known_hosts: Path | None
    check_host_key: bool
    connect_timeout: int
    passphrase_file: Path | None = None
    password_file: Path | None = None

    @classmethod
    def of(cls, config: FacilityConfig, base_dir: Path | str) -> Login:
        return cls(
            host=config.host,
            port=config.port,
            username=config.username,
            key=resolve(config.ssh_key, base_dir),
            known_hosts=resolve(config.known_hosts, base_dir),
            check_host_key=config.check_host_key,
            connect_timeout=config.connect_timeout,
            passphrase_file=resolve(config.ssh_key_passphrase_file, base_dir),
            password_file=resolve(config.password_file, base_dir),
        )

    @property
    def known_hosts_shown(self) -> str:
        return str(self.known_hosts or DEFAULT_KNOWN_HOSTS)

    def missing_file(self) -> LoginProblem | None:
        """A configured file that is not there: the first thing to say, before any network."""
        for what, option, path, fix in (
            ("ssh key", "sshKey", self.key, "fix sshKey / ssh_key to point at your private key"),
            (
                "known hosts",
                "knownHosts",
                self.known_hosts,
                "fix knownHosts / known_hosts, or create it with ssh-keyscan",
            ),
            ("ssh key passphrase", "sshKeyPassphraseFile", self.passphrase_file, "fix sshKeyPassphraseFile"),
            ("password", "passwordFile", self.password_file, "fix passwordFile"),
        ):
            if path is not None and not path.is_file():
                return LoginProblem(what, f"{option} {path} does not exist", fix)
        return None


def connect_options(login: Login, client_keys: Any = None, timeout: int | None = None) -> dict[str, Any]:
    """asyncssh.connect keyword arguments: StreamFlow's options plus the facility's known_hosts."""
    if client_keys is None:
        client_keys = [str(login.key)] if login.key else ()
    return {
        "host": login.host,
        "port": login.port,
        "username": login.username,
        "client_keys": client_keys,
        "passphrase": _secret(login.passphrase_file),
        "password": _secret(login.password_file),
        "known_hosts": (str(login.known_hosts) if login.known_hosts else ()) if login.check_host_key else None,
        "encryption_algs": list(ENCRYPTION_ALGS),
        "compression_algs": None,
        "connect_timeout": timeout or login.connect_timeout,
    }


async def connect(login: Login, timeout: int | None = None):
    import asyncssh

    return await asyncssh.connect(**connect_options(login, timeout=timeout))


@dataclass(frozen=True)
class LoginProblem(Exception):
    """Why a login failed, in the words a user can act on."""

    what: str  # host key | login | reachable | ssh key | known hosts | ...
    detail: str
    fix: str

    def __str__(self) -> str:
        return f"{self.detail}; {self.fix}"


def explain(exc: BaseException, login: Login) -> LoginProblem:
    """A failed connection as a LoginProblem; anything unexpected counts as unreachable."""
    import asyncssh

    where = f"{login.host}:{login.port}"
    if isinstance(exc, LoginProblem):
        return exc
    if isinstance(exc, asyncssh.HostKeyNotVerifiable):
        return LoginProblem(
            "host key",
            f"{where} is not trusted by {login.known_hosts_shown} ({exc.reason})",
            f"verify its fingerprint, then: ssh-keyscan -p {login.port} {login.host} >> {login.known_hosts_shown}",
        )
    if isinstance(exc, asyncssh.PermissionDenied):
        return LoginProblem(
            "login",
            f"{where} refused user {login.username} with key {login.key or '(default keys)'}",
            f"authorize the public key for {login.username}, or fix username / ssh_key",
        )
    if isinstance(exc, asyncio.TimeoutError):
        detail = "timed out"
    else:
        detail = str(exc) or type(exc).__name__
    return LoginProblem(
        "reachable",
        f"cannot reach {where} ({detail})",
        "check host and port, and that this machine can reach the login node",
    )
