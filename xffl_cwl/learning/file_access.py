"""Opening files that came from another machine: regular files only, and never more than asked for.

A symbolic link (to the global weights, to /dev/zero), a FIFO (open() would wait forever), a device
or a directory where a file is expected is refused before a byte is read; sizes are checked before
anything is allocated.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)


class UnsafeFile(ValueError):
    """A file that must not be read; the message says why, without the path (the caller names it)."""


class MalformedJSON(ValueError):
    """JSON that a strict reader refuses; the message says why."""


def _pairs(items: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in items:
        if key in out:
            raise MalformedJSON(f"the key {key[:80]!r} appears twice")
        out[key] = value
    return out


def _constant(name: str) -> object:
    raise MalformedJSON(f"{name} is not JSON")


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > 20:
        raise MalformedJSON(f"the integer {text[:24]}... is too long")
    return int(text)


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise MalformedJSON(f"the number {text[:24]} is out of range")
    return value


def loads_strict(raw: bytes) -> object:
    """JSON as other readers agree on it: UTF-8, no duplicate keys, no NaN/Infinity, bounded integers and depth."""
    try:
        return json.loads(
            raw.decode("utf-8"),
            object_pairs_hook=_pairs,
            parse_constant=_constant,
            parse_int=_bounded_int,
            parse_float=_finite_float,
        )
    except RecursionError:
        raise MalformedJSON("it is nested too deeply") from None
    except UnicodeDecodeError:
        raise MalformedJSON("it is not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise MalformedJSON(f"it is not JSON ({exc.msg} at byte {exc.pos})") from None


def open_regular(path: Path, follow_links: bool = False) -> int:
    """A read-only descriptor of a regular file; symbolic links are refused unless `follow_links`."""
    flags = _FLAGS | (0 if follow_links else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeFile("is a symbolic link; updates must hold regular files") from None
        if exc.errno == errno.ENOENT:
            raise UnsafeFile("is missing") from None
        raise UnsafeFile(f"cannot be opened ({exc.strerror})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a device or socket"
        raise UnsafeFile(f"is {kind}, not a regular file")
    return fd


def read_regular(path: Path, limit: int, follow_links: bool = False) -> bytes:
    """The whole content of a regular file of at most `limit` bytes."""
    fd = open_regular(path, follow_links)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise UnsafeFile(f"is {size} bytes, more than the {limit} bytes such a file may have")
        chunks, left = [], size
        while left > 0:
            chunk = os.read(fd, left)
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def lstat_kind(path: Path) -> str | None:
    """'file', 'dir', 'link' or 'other' for what is at `path` itself (links not followed); None if nothing."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(mode):
        return "link"
    return "file" if stat.S_ISREG(mode) else "dir" if stat.S_ISDIR(mode) else "other"
