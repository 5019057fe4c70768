"""Outputs appear whole or not at all: write beside the target, make it durable, then rename.

If the process is stopped (an error, Ctrl-C, SIGTERM from scancel or a timeout: the CLI turns it into
SystemExit) the temporary sibling is removed; a crash leaves only a dot-named temporary folder.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from xffl_cwl.errors import InputError


def check_output_dir(path: Path, option: str = "--out") -> None:
    """Refuse to overwrite anything: an existing non-empty output is somebody's data."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise InputError(f"{option} {path} already exists and is not empty; choose a new path or remove it")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Every file and folder under `root`, and `root` itself, on stable storage."""
    for folder, _, names in os.walk(root):
        for name in names:
            _fsync(Path(folder) / name)
        _fsync(Path(folder))


@contextlib.contextmanager
def atomic_dir(path: Path, option: str = "--out") -> Iterator[Path]:
    """Yield a temporary sibling of `path`; rename it to `path` only if the block succeeds."""
    path = Path(path)
    check_output_dir(path, option)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        fsync_tree(tmp)
        if path.exists():
            path.rmdir()  # empty, checked above
        os.rename(tmp, path)
        _fsync(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    """The process's umask, read without changing it (os.umask would, for every thread)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def write_text_atomic(path: Path, text: str) -> None:
    """Write a whole file through a temporary sibling."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write a whole file through a temporary sibling."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # as open() would make it, not mkstemp's 0600
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
