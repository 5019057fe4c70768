"""Read and write safetensors checkpoints in bounded pieces.

The format is an 8-byte little-endian header length, a JSON header (dtype, shape and byte
offsets of every tensor), then the raw bytes. Parsing it ourselves lets us read any slice of a
tensor with plain `readinto` calls, so nothing is memory-mapped (mapped pages count in RSS) and
nothing is unpickled, and write an output whose header is known before its data exists.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from xffl_cwl.errors import InputError
from xffl_cwl.learning.model_dir import INDEX_SUFFIX

MAX_HEADER_BYTES = 100 * 1024 * 1024

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
FLOAT_CODES = frozenset({"F64", "F32", "F16", "BF16"})


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: its file and the absolute byte range of its data."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    begin: int
    end: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.torch_dtype).element_size()

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_CODES


@dataclass
class ShardFile:
    """One .safetensors file: its metadata and its tensors in storage order."""

    relpath: str
    metadata: dict[str, str]
    entries: list[TensorEntry]


@dataclass
class Checkpoint:
    """All tensors of a checkpoint (one file or a sharded set with an index)."""

    root: Path
    shards: list[ShardFile]
    index_name: str | None = None
    by_name: dict[str, TensorEntry] = field(init=False)

    def __post_init__(self) -> None:
        self.by_name = {e.name: e for s in self.shards for e in s.entries}

    def entries(self) -> Iterator[TensorEntry]:
        for shard in self.shards:
            yield from shard.entries

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries())

    @property
    def relpaths(self) -> list[str]:
        return [s.relpath for s in self.shards]


def read_shard(path: Path, relpath: str) -> ShardFile:
    """Parse one file's header and check its offsets against the file size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            raw_len = fh.read(8)
            if len(raw_len) != 8:
                raise InputError(f"{path} is not a safetensors file (shorter than 8 bytes)")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise InputError(f"{path} is not a safetensors file (header length {header_len} is impossible)")
            header = json.loads(fh.read(header_len))
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path} is not a safetensors file (its header is not JSON)") from exc
    if not isinstance(header, dict):
        raise InputError(f"{path} is not a safetensors file (its header is not a JSON object)")
    data_start = 8 + header_len
    metadata = header.pop("__metadata__", None) or {}
    entries = []
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{path}: tensor {name!r} has a malformed header entry") from exc
        if dtype not in DTYPES:
            raise InputError(f"{path}: tensor {name!r} has dtype {dtype}, which xffl-cwl does not handle")
        entry = TensorEntry(name, dtype, shape, path, data_start + int(begin), data_start + int(end))
        if entry.end > size or entry.begin > entry.end or entry.nbytes != entry.numel * entry.itemsize:
            raise InputError(f"{path}: tensor {name!r} has offsets that do not match its shape or the file size")
        entries.append(entry)
    entries.sort(key=lambda e: e.begin)
    return ShardFile(relpath, {str(k): str(v) for k, v in metadata.items()}, entries)


def read_checkpoint(directory: Path, stem: str = "model") -> Checkpoint:
    """Find `<stem>.safetensors` or `<stem>.safetensors.index.json` in a directory (HF layout)."""
    directory = Path(directory)
    index = directory / f"{stem}{INDEX_SUFFIX}"
    single = directory / f"{stem}.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InputError(f"{index} is not a valid safetensors index (needs a weight_map)") from exc
        relpaths = sorted(set(weight_map.values()))
        for rel in relpaths:
            if "/" in rel or rel.startswith("."):
                raise InputError(f"{index} names a shard outside its directory: {rel!r}")
        shards = [read_shard(directory / rel, rel) for rel in relpaths]
        ckpt = Checkpoint(directory, shards, index.name)
        missing = set(weight_map) - set(ckpt.by_name)
        if missing:
            raise InputError(f"{index} lists tensor {sorted(missing)[0]!r} that no shard holds")
        return ckpt
    if single.is_file():
        return Checkpoint(directory, [read_shard(single, single.name)])
    raise InputError(
        f"{directory} holds no {stem}.safetensors (nor a sharded index); is it a Hugging Face model directory?"
    )


def row_chunks(shape: tuple[int, ...], max_elems: int) -> Iterator[tuple[int, int]]:
    """Split a tensor into (start, count) element ranges of whole rows, at most `max_elems` each when a row fits."""
    total = 1
    for d in shape:
        total *= d
    row = total // shape[0] if len(shape) >= 2 and shape[0] else 1
    step = max(1, max_elems // max(row, 1)) * row
    start = 0
    while start < total:
        count = min(step, total - start)
        yield start, count
        start += count


class TensorReader:
    """Reads element ranges of tensors with positioned reads; keeps one descriptor per file."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}
        self.bytes_read = 0

    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            fd = os.open(path, os.O_RDONLY)
            self._fds[path] = fd
        return fd

    def read(self, entry: TensorEntry, start: int = 0, count: int | None = None) -> torch.Tensor:
        """A flat tensor with `count` elements of `entry` from element `start`, in the stored dtype."""
        count = entry.numel - start if count is None else count
        out = torch.empty(count, dtype=entry.torch_dtype)
        view = memoryview(out.view(torch.uint8).numpy()) if count else memoryview(b"")
        offset = entry.begin + start * entry.itemsize
        fd = self._fd(entry.file)
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if n <= 0:
                raise InputError(f"{entry.file}: tensor {entry.name!r} is truncated")
            done += n
        self.bytes_read += done
        return out

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class TensorSpec:
    """What a writer needs to lay out one tensor before its data exists."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def nbytes(self) -> int:
        n = torch.empty((), dtype=self.torch_dtype).element_size()
        for d in self.shape:
            n *= d
        return n


def specs_of(entries: list[TensorEntry]) -> list[TensorSpec]:
    return [TensorSpec(e.name, e.dtype, e.shape) for e in entries]


class ShardWriter:
    """Writes one safetensors file whose header is fixed up front; data must come in spec order."""

    def __init__(self, path: Path, specs: list[TensorSpec], metadata: dict[str, str] | None = None) -> None:
        header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        for spec in specs:
            header[spec.name] = {
                "dtype": spec.dtype,
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            offset += spec.nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self.path = path
        self._specs = list(specs)
        self._pos = 0  # index of the tensor being written
        self._written_in_tensor = 0
        self._hash = hashlib.sha256()
        self._fh = open(path, "wb")  # noqa: SIM115 - closed by close(), which finishes the file
        self._emit(struct.pack("<Q", len(blob)) + blob)
        self.bytes_written = 8 + len(blob)

    def _emit(self, data: bytes | memoryview) -> None:
        self._fh.write(data)
        self._hash.update(data)

    def write(self, name: str, chunk: torch.Tensor) -> None:
        """Append the next piece of tensor `name` (any shape; its bytes in row-major order)."""
        if self._pos >= len(self._specs):
            raise RuntimeError(f"{self.path}: more data than its header announced (tensor {name!r})")
        spec = self._specs[self._pos]
        if name != spec.name or chunk.dtype != DTYPES[spec.dtype]:
            raise RuntimeError(f"{self.path}: expected {spec.name} ({spec.dtype}), got {name} ({chunk.dtype})")
        data = chunk.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        self._emit(memoryview(data))
        self._written_in_tensor += data.nbytes
        self.bytes_written += data.nbytes
        if self._written_in_tensor > spec.nbytes:
            raise RuntimeError(f"{self.path}: tensor {name!r} got more bytes than its shape holds")
        if self._written_in_tensor == spec.nbytes:
            self._pos += 1
            self._written_in_tensor = 0
            self._skip_empty()

    def _skip_empty(self) -> None:
        while self._pos < len(self._specs) and self._specs[self._pos].nbytes == 0:
            self._pos += 1

    def close(self) -> str:
        """Finish the file and return its sha256."""
        self._skip_empty()
        self._fh.close()
        if self._pos != len(self._specs):
            raise RuntimeError(f"{self.path}: tensor {self._specs[self._pos].name!r} was not fully written")
        return self._hash.hexdigest()
