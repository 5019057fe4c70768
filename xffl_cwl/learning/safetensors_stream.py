"""Read and write safetensors checkpoints in bounded pieces.

The format is an 8-byte little-endian header length, a JSON header (dtype, shape and byte
offsets of every tensor), then the raw bytes. Parsing it ourselves lets us read any slice of a
tensor with plain `readinto` calls, so nothing is memory-mapped (mapped pages count in RSS) and
nothing is unpickled, and write an output whose header is known before its data exists.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import queue
import re
import struct
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xffl_cwl.errors import InputError
from xffl_cwl.learning.file_access import MalformedJSON, UnsafeFile, loads_strict, open_regular, read_regular
from xffl_cwl.learning.model_dir import INDEX_SUFFIX

MAX_HEADER_BYTES = 100 * 1024 * 1024

# How each stored dtype is held in memory. numpy has no bfloat16: BF16 values stay their raw
# 16 bits (uint16) until to_f32 widens them, and from_f32 rounds back to nearest even, as torch does.
NUMPY_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(np.uint16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
TORCH_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
    "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}  # fmt: skip
FLOAT_CODES = frozenset({"F64", "F32", "F16", "BF16"})
_ITEMSIZE = {code: dtype.itemsize for code, dtype in NUMPY_DTYPES.items()}


def to_f32(values: np.ndarray, code: str) -> np.ndarray:
    """Stored float values as float32 (a new array unless they already are float32)."""
    if code == "BF16":
        return (values.astype(np.uint32) << 16).view(np.float32)
    return values.astype(np.float32, copy=False)


def from_f32(values: np.ndarray, code: str) -> np.ndarray:
    """float32 values in a stored float dtype; BF16 rounds to nearest even (NaN stays a NaN)."""
    if code == "BF16":
        bits = values.view(np.uint32)
        rounded = ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16).astype(np.uint16)
        nan = np.isnan(values)
        if nan.any():
            rounded[nan] = 0x7FC0
        return rounded
    with np.errstate(over="ignore"):  # too large for F16 becomes Inf, as in torch; the merge checks its output
        return values.astype(NUMPY_DTYPES[code], copy=False)


def _torch_dtype(code: str) -> Any:
    """torch's dtype for a stored one; torch is imported only by callers that already hold torch tensors."""
    import torch

    return getattr(torch, TORCH_NAMES[code])


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
        return math.prod(self.shape)

    @property
    def torch_dtype(self) -> Any:
        """The torch.dtype of the stored values, for the training side."""
        return _torch_dtype(self.dtype)

    @property
    def itemsize(self) -> int:
        return _ITEMSIZE[self.dtype]

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


class HeaderError(ValueError):
    """A header that is not a well-formed safetensors header; the message names what is wrong."""


def _json(raw: bytes) -> object:
    try:
        return loads_strict(raw)
    except MalformedJSON as exc:
        raise HeaderError(str(exc)) from None


def _count(value: object, what: str) -> int:
    """A JSON integer >= 0: not a float, a string or a boolean that Python would coerce."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise HeaderError(f"{what} must be a non-negative JSON integer, got {value!r:.40}")
    return value


def parse_header(raw: bytes, data_len: int) -> tuple[dict[str, str], list[tuple[str, str, tuple[int, ...], int, int]]]:
    """Metadata and (name, dtype, shape, begin, end) of every tensor, data offsets relative to the data.

    At least as strict as the reference `safetensors` library: every offset a JSON integer,
    0 <= begin <= end, byte length = shape x dtype size, and the ranges tile the data exactly
    (no holes, no overlaps, nothing after the last tensor); also no duplicate keys.
    """
    header = _json(raw)
    if not isinstance(header, dict):
        raise HeaderError("it is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise HeaderError("__metadata__ must map strings to strings")
    tensors = []
    for name, info in header.items():
        label = f"tensor {name[:120]!r}"
        if not name or len(name) > 1024:
            raise HeaderError(f"{label} has an empty or over-long name")
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise HeaderError(f"{label} must have exactly dtype, shape and data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in NUMPY_DTYPES:
            raise HeaderError(f"{label} has dtype {dtype!r:.40}, which xffl-cwl does not handle")
        if not isinstance(shape, list) or len(shape) > 8:
            raise HeaderError(f"{label} has a shape that is not a list of at most 8 dimensions")
        dims = tuple(_count(d, f"{label}'s shape") for d in shape)
        if not isinstance(offsets, list) or len(offsets) != 2:
            raise HeaderError(f"{label}'s data_offsets must be [begin, end]")
        begin, end = (_count(o, f"{label}'s data_offsets") for o in offsets)
        numel = 1
        for d in dims:
            numel *= d
        if begin > end or end - begin != numel * _ITEMSIZE[dtype]:
            raise HeaderError(f"{label} spans bytes [{begin}, {end}), which does not hold {list(dims)} of {dtype}")
        tensors.append((name, dtype, dims, begin, end))
    tensors.sort(key=lambda t: (t[3], t[4]))
    position = 0
    for name, _, _, begin, end in tensors:
        if begin != position:
            problem = (
                "overlaps the previous one"
                if begin < position
                else f"leaves a hole of {begin - position} bytes before it"
            )
            raise HeaderError(f"tensor {name[:120]!r} {problem}")
        position = end
    if position != data_len:
        raise HeaderError(f"the data_offsets cover {position} bytes of data but the file holds {data_len}")
    return {str(k): v for k, v in metadata.items()}, tensors


def read_shard(path: Path, relpath: str, untrusted: bool = False, max_header: int = MAX_HEADER_BYTES) -> ShardFile:
    """Parse one file's header and check it against the file; `untrusted` files must also be regular files."""
    try:
        fd = open_regular(path, follow_links=not untrusted)
    except UnsafeFile as exc:
        raise InputError(f"{path} {exc}") from None
    try:
        size = os.fstat(fd).st_size
        raw_len = os.pread(fd, 8, 0)
        if len(raw_len) != 8:
            raise InputError(f"{path} is not a safetensors file (shorter than 8 bytes)")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > max_header or 8 + header_len > size:
            raise InputError(
                f"{path} is not a safetensors file (header length {header_len} is impossible or over {max_header} bytes)"
            )
        raw = os.pread(fd, header_len, 8)
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from exc
    finally:
        os.close(fd)
    try:
        metadata, tensors = parse_header(raw, size - 8 - header_len)
    except HeaderError as exc:
        raise InputError(f"{path} is not a valid safetensors file: {exc}") from None
    if untrusted:
        _reference_check(path)
    start = 8 + header_len
    entries = [
        TensorEntry(name, dtype, shape, path, start + begin, start + end) for name, dtype, shape, begin, end in tensors
    ]
    return ShardFile(relpath, metadata, entries)


def _reference_check(path: Path) -> None:
    """The reference library must accept the file too (it maps the file but reads only the header here)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as f:  # "np": the check needs no torch
            f.keys()
    except Exception as exc:  # the library's own error types vary between versions
        raise InputError(f"{path} is rejected by the safetensors library ({str(exc)[:200]})") from None


SHARD_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,200}\.safetensors$")
MAX_INDEX_BYTES = 16 * 1024 * 1024


def read_checkpoint(
    directory: Path, stem: str = "model", untrusted: bool = False, max_header: int = MAX_HEADER_BYTES
) -> Checkpoint:
    """Find `<stem>.safetensors` or `<stem>.safetensors.index.json` in a directory (HF layout)."""
    directory = Path(directory)
    index = directory / f"{stem}{INDEX_SUFFIX}"
    single = directory / f"{stem}.safetensors"
    if index.exists() or index.is_symlink():
        try:
            weight_map = _json(read_regular(index, MAX_INDEX_BYTES, follow_links=not untrusted))
        except (UnsafeFile, HeaderError) as exc:
            raise InputError(f"{index} is not a valid safetensors index: {exc}") from None
        if not isinstance(weight_map, dict) or not isinstance(weight_map.get("weight_map"), dict):
            raise InputError(f"{index} is not a valid safetensors index (needs a weight_map object)")
        weight_map = weight_map["weight_map"]
        for name, rel in weight_map.items():
            if not isinstance(rel, str) or not SHARD_NAME.fullmatch(rel):
                raise InputError(
                    f"{index} maps tensor {name[:120]!r} to {rel!r:.80}, which is not a shard file in its directory"
                )
        relpaths = sorted(set(weight_map.values()))
        shards = [read_shard(directory / rel, rel, untrusted, max_header) for rel in relpaths]
        ckpt = Checkpoint(directory, shards, index.name)
        if sum(len(s.entries) for s in shards) != len(ckpt.by_name):
            raise InputError(f"{index}: a tensor is stored in more than one shard")
        for name, rel in weight_map.items():
            entry = ckpt.by_name.get(name)
            if entry is None or entry.file.name != rel:
                raise InputError(f"{index} lists tensor {name[:120]!r} in {rel}, which does not hold it")
        if set(ckpt.by_name) != set(weight_map):
            extra = sorted(set(ckpt.by_name) - set(weight_map))[0]
            raise InputError(f"{index} does not list tensor {extra[:120]!r}, which a shard holds")
        return ckpt
    if single.exists() or single.is_symlink():
        return Checkpoint(directory, [read_shard(single, single.name, untrusted, max_header)])
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
            fd = open_regular(path, follow_links=True)  # a FIFO swapped in would hang a plain open
            self._fds[path] = fd
        return fd

    def read(
        self, entry: TensorEntry, start: int = 0, count: int | None = None, into: np.ndarray | None = None
    ) -> np.ndarray:
        """A flat array with `count` elements of `entry` from element `start`, in the stored dtype
        (BF16 as its raw uint16 bits; see to_f32). `into`, a buffer of that dtype and at least that
        size, is filled instead of a new array: a fresh 4 MB array costs page faults on every chunk."""
        count = entry.numel - start if count is None else count
        dtype = NUMPY_DTYPES[entry.dtype]
        out = (
            into[:count] if into is not None and into.dtype == dtype and into.size >= count else np.empty(count, dtype)
        )
        view = memoryview(out.view(np.uint8)) if count else memoryview(b"")
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
    def torch_dtype(self) -> Any:
        """The torch.dtype of the stored values, for the training side."""
        return _torch_dtype(self.dtype)

    @property
    def nbytes(self) -> int:
        n = _ITEMSIZE[self.dtype]
        for d in self.shape:
            n *= d
        return n


def specs_of(entries: list[TensorEntry]) -> list[TensorSpec]:
    return [TensorSpec(e.name, e.dtype, e.shape) for e in entries]


def _hash_chunks(chunks: queue.Queue, digest: Any) -> None:
    while (data := chunks.get()) is not None:
        digest.update(data)


class _BackgroundHash:
    """sha256 of the bytes handed to it, computed on another thread (hashlib releases the GIL), so
    hashing a written model overlaps with computing it. At most `depth` chunks wait, which bounds memory."""

    def __init__(self, depth: int = 4) -> None:
        self._queue: queue.Queue[memoryview | bytes | None] = queue.Queue(maxsize=depth)
        self._digest = hashlib.sha256()
        # The thread holds the queue and the digest, not this object, so dropping it runs the finalizer.
        self._thread = threading.Thread(
            target=_hash_chunks, args=(self._queue, self._digest), name="sha256", daemon=True
        )
        self._thread.start()
        # A writer dropped half-way (a rejected update, an error) must not leave its thread waiting.
        self._stop = weakref.finalize(self, self._queue.put, None)

    def update(self, data: memoryview | bytes) -> None:
        self._queue.put(data)

    def hexdigest(self) -> str:
        self._stop()
        self._thread.join()
        return self._digest.hexdigest()


class ShardWriter:
    """Writes one safetensors file whose header is fixed up front; data must come in spec order.

    Its sha256 is computed from the chunks themselves, on a background thread unless `background` is
    False: a chunk must not be changed after it was written."""

    def __init__(
        self,
        path: Path,
        specs: list[TensorSpec],
        metadata: dict[str, str] | None = None,
        hashed: bool = True,
        background: bool = True,
    ) -> None:
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
        # nothing names the optimizer state by its hash; on a busy machine a hashing thread only competes
        self._hash = (_BackgroundHash() if background else hashlib.sha256()) if hashed else None
        self._fh = open(path, "wb")  # noqa: SIM115 - closed by close(), which finishes the file
        self._emit(struct.pack("<Q", len(blob)) + blob)
        self.bytes_written = 8 + len(blob)

    def _emit(self, data: bytes | memoryview) -> None:
        self._fh.write(data)
        if self._hash is not None:
            self._hash.update(data)

    def write(self, name: str, chunk: np.ndarray) -> None:
        """Append the next piece of tensor `name` (any shape; its bytes in row-major order).

        `chunk` is a numpy array in the stored dtype (BF16: its uint16 bits) or a CPU torch tensor."""
        if self._pos >= len(self._specs):
            raise RuntimeError(f"{self.path}: more data than its header announced (tensor {name!r})")
        spec = self._specs[self._pos]
        if not isinstance(chunk, np.ndarray):  # a torch tensor, from training
            if name != spec.name or str(chunk.dtype) != f"torch.{TORCH_NAMES[spec.dtype]}":
                raise RuntimeError(f"{self.path}: expected {spec.name} ({spec.dtype}), got {name} ({chunk.dtype})")
            chunk = chunk.detach().contiguous().reshape(-1).view(_torch_dtype("U8")).numpy()
        elif name != spec.name or chunk.dtype != NUMPY_DTYPES[spec.dtype]:
            raise RuntimeError(f"{self.path}: expected {spec.name} ({spec.dtype}), got {name} ({chunk.dtype})")
        data = np.ascontiguousarray(chunk).reshape(-1).view(np.uint8)
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
        """Finish the file and return its sha256 (empty when it was not hashed)."""
        self._skip_empty()
        self._fh.close()
        if self._pos != len(self._specs):
            raise RuntimeError(f"{self.path}: tensor {self._specs[self._pos].name!r} was not fully written")
        return self._hash.hexdigest() if self._hash is not None else ""
