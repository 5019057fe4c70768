"""Client updates: the trust boundary. Everything in an update directory came from another
machine; it is read here, and only here, with bounded sizes, regular files only, strict JSON and
safetensors headers at least as strict as the reference library's, and typed, range-checked fields.

Every problem raises `Rejected` with the facility and a one-line reason naming the file, tensor or
field at fault; screening reports it and carries on with the remaining updates.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from xffl_cwl.contract.layout import STATUS_SUFFIX, UPDATE_JSON, UPDATE_NAME
from xffl_cwl.contract.records import LeftOut, RecordError, TrainStatus, UpdateRecord
from xffl_cwl.errors import InputError
from xffl_cwl.learning.aggregation.lora import (
    AdapterConfig,
    LoraModule,
    NotFinite,
    UnsupportedAdapter,
    adapter_modules,
    change_norm_sq,
    parse_config,
)
from xffl_cwl.learning.deltas import STORED_CODE, block_count
from xffl_cwl.learning.file_access import MalformedJSON, UnsafeFile, loads_strict, read_regular
from xffl_cwl.learning.model_change import DELTA_STEM, SCALES_STEM
from xffl_cwl.learning.model_dir import ADAPTER_CONFIG, ADAPTER_STEM, MODEL_STEM
from xffl_cwl.learning.safetensors_stream import Checkpoint, TensorReader, read_checkpoint

MAX_RECORD_BYTES = 64 * 1024  # update.json and adapter_config.json are a few hundred bytes
MAX_CHANGE_NORM_SQ = 1e60  # an adapter whose change is larger than 1e30 (L2) would overflow fp32 weights


class Rejected(Exception):
    """An update that must not be used; `reason` is one line."""

    def __init__(self, facility: str, path: Path, reason: str) -> None:
        super().__init__(f"update from facility {facility!r} ({path}) rejected: {reason}")
        self.facility = facility
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class UpdateSource:
    """An update as the workflow hands it over: who it is from (the workflow says so) and where it is."""

    name: str
    path: Path

    @classmethod
    def parse(cls, value: str | Path) -> UpdateSource:
        """`NAME=DIR`, or `DIR`, whose own name is then the facility's (the train step names it so)."""
        text = str(value)
        head, sep, tail = text.partition("=")
        if sep and "/" not in head:  # NAME=DIR (a path that merely contains "=" has a "/" before it)
            if not UPDATE_NAME.fullmatch(head) or not tail:
                raise InputError(f"--update {text!r:.100}: give NAME=DIR with NAME of letters, digits, _ and -")
            return cls(head, Path(tail))
        name = Path(text).name
        if not UPDATE_NAME.fullmatch(name):
            raise InputError(f"--update {text!r:.100}: give NAME=DIR, or a directory named after its facility")
        return cls(name, Path(text))


@dataclass(frozen=True)
class Limits:
    """Sizes an update's files may have, derived from the global model they must match."""

    max_header: int

    @classmethod
    def of(cls, glob: Checkpoint) -> Limits:
        largest = max((_header_len(s.entries) for s in glob.shards), default=0)
        total = sum(_header_len(s.entries) for s in glob.shards)
        # An update's header names the same tensors (or two small ones per adapted matrix).
        return cls(max_header=max(64 * 1024, 2 * largest, 4 * total))


def _header_len(entries) -> int:
    return entries[0].begin if entries else 0


@dataclass
class Update:
    path: Path
    record: UpdateRecord
    checkpoint: Checkpoint
    adapter: AdapterConfig | None = None
    modules: dict[str, LoraModule] = field(default_factory=dict)
    scales: Checkpoint | None = None  # an int8-encoded update's block scales

    @property
    def encoding(self) -> str:
        return self.record.encoding

    @property
    def facility(self) -> str:
        return self.record.facility

    @property
    def round(self) -> int:
        return self.record.round

    @property
    def mode(self) -> str:
        return self.record.mode

    @property
    def samples(self) -> int:
        return self.record.samples

    @property
    def tokens(self) -> int:
        return self.record.tokens

    def reject(self, reason: str) -> Rejected:
        return Rejected(self.facility, self.path, reason)


def _json_file(path: Path, source: UpdateSource) -> object:
    try:
        return loads_strict(read_regular(path, MAX_RECORD_BYTES))
    except (UnsafeFile, MalformedJSON) as exc:
        raise Rejected(source.name, source.path, f"{path.name} {exc}") from None


def load_update(source: UpdateSource, global_dir: Path, limits: Limits) -> Update:
    """Parse update.json and the weight headers of one update; no tensor data is read yet."""
    path = source.path
    if not path.is_dir():
        raise Rejected(source.name, path, "not a directory")
    if os.path.samefile(path, global_dir):
        raise Rejected(source.name, path, "it is the global model directory itself")
    data = _json_file(path / UPDATE_JSON, source)
    try:
        record = UpdateRecord.from_json(data)
    except RecordError as exc:
        raise Rejected(source.name, path, str(exc)) from None
    if record.facility != source.name:
        raise Rejected(
            source.name,
            path,
            f"update.json says it comes from {record.facility!r}, the workflow delivered it as {source.name!r}",
        )
    try:
        if record.mode == "full" and record.encoding != "fp32":  # the change of the weights, encoded
            ckpt = read_checkpoint(path, DELTA_STEM, untrusted=True, max_header=limits.max_header)
            update = Update(path, record, ckpt)
            if record.encoding == "int8":
                update.scales = read_checkpoint(path, SCALES_STEM, untrusted=True, max_header=limits.max_header)
            return update
        ckpt = read_checkpoint(
            path, MODEL_STEM if record.mode == "full" else ADAPTER_STEM, untrusted=True, max_header=limits.max_header
        )
        update = Update(path, record, ckpt)
        if record.mode == "lora":
            update.adapter = parse_config(_json_file(path / ADAPTER_CONFIG, source))
            update.modules = adapter_modules(ckpt, update.adapter)
    except (InputError, UnsupportedAdapter) as exc:
        raise Rejected(source.name, path, str(exc)) from None
    return update


def check_same_layout(update: Update, reference: Checkpoint, what: str) -> None:
    """Same tensor names, shapes, dtypes (and shard files) as `reference` (the global model or global adapter)."""
    for entry in reference.entries():
        mine = update.checkpoint.by_name.get(entry.name)
        if mine is None:
            raise update.reject(f"tensor {entry.name!r} of the {what} is missing")
        if mine.shape != entry.shape:
            raise update.reject(
                f"tensor {entry.name!r} has shape {list(mine.shape)}, the {what} has {list(entry.shape)}"
            )
        if mine.dtype != entry.dtype:
            raise update.reject(f"tensor {entry.name!r} has dtype {mine.dtype}, the {what} has {entry.dtype}")
    extra = sorted(set(update.checkpoint.by_name) - set(reference.by_name))
    if extra:
        raise update.reject(f"tensor {extra[0][:120]!r} is not in the {what}")


def check_encoded_layout(update: Update, glob: Checkpoint) -> None:
    """An encoded full update: exactly the global model's float tensors, in the encoding's dtype, and
    for int8 one F32 scale per block of each."""
    floats = {e.name: e for e in glob.entries() if e.is_float}
    stored = STORED_CODE[update.encoding]
    for name, entry in floats.items():
        mine = update.checkpoint.by_name.get(name)
        if mine is None:
            raise update.reject(f"tensor {name!r} of the global model is missing from its encoded change")
        if mine.shape != entry.shape or mine.dtype != stored:
            raise update.reject(
                f"tensor {name!r} is {mine.dtype} {list(mine.shape)}, its {update.encoding} change must be {stored} {list(entry.shape)}"
            )
        if update.scales is not None:
            scale = update.scales.by_name.get(name)
            if scale is None or scale.dtype != "F32" or scale.shape != (block_count(entry.numel),):
                raise update.reject(f"tensor {name!r} needs {block_count(entry.numel)} F32 block scales")
    extra = sorted(set(update.checkpoint.by_name) - set(floats))
    extra += sorted(set(update.scales.by_name) - set(floats)) if update.scales is not None else []
    if extra:
        raise update.reject(f"tensor {extra[0][:120]!r} is not a float tensor of the global model")


def check_adapter_fits(update: Update, base: Checkpoint) -> None:
    """Every adapted module exists in the base model with the shape B @ A produces, at a rank it can have."""
    for base_name, module in update.modules.items():
        target = base.by_name.get(base_name)
        if target is None:
            raise update.reject(
                f"tensor {module.a.name[:120]!r} adapts {base_name[:120]!r}, which the global model does not have"
            )
        if len(target.shape) != 2 or target.shape != (module.b.shape[0], module.a.shape[1]):
            raise update.reject(
                f"tensors {module.a.name!r}/{module.b.name!r} give a {module.b.shape[0]}x{module.a.shape[1]} change, "
                f"but {base_name!r} is {'x'.join(map(str, target.shape))}"
            )
        if module.rank > min(target.shape):
            raise update.reject(
                f"tensor {module.a.name!r} has rank {module.rank}, more than {base_name!r} can have ({min(target.shape)})"
            )
        if not module.a.is_float or not module.b.is_float or not target.is_float:
            raise update.reject(f"tensor {module.a.name!r} is not floating point")
        if not math.isfinite(module.scale):
            raise update.reject(f"tensor {module.a.name!r} has a scale that is not finite")


def check_adapter_change(update: Update, reader: TensorReader, chunk_elems: int) -> None:
    """Each module's change scale * B @ A must be finite and sane, whatever the merge does with A and B.

    Adapters are small: this reads each once, and never forms B @ A (see lora.change_norm_sq).
    """
    for base_name, module in update.modules.items():
        try:
            norm_sq = change_norm_sq(module, reader, chunk_elems)
        except NotFinite as exc:
            raise update.reject(f"tensor {str(exc)!r} holds NaN or Inf values") from None
        if not math.isfinite(norm_sq) or norm_sq > MAX_CHANGE_NORM_SQ:
            raise update.reject(f"its change to {base_name!r} overflows (lora_A/lora_B values too large)")


def read_status(path: Path, round_number: int | None) -> tuple[str, TrainStatus | None, str | None]:
    """(facility, status, problem) of a `<facility>.status.json` a train step wrote (or its plugin did).

    The file's name says whose it is (the workflow names it); a record that claims another facility,
    another round, or cannot be read is a problem, and the facility is then left out with it.
    """
    name = path.name[: -len(STATUS_SUFFIX)] if path.name.endswith(STATUS_SUFFIX) else ""
    if not UPDATE_NAME.fullmatch(name):
        raise InputError(f"--status {str(path)!r:.100}: a status file is named <facility>{STATUS_SUFFIX}")
    try:
        # the path itself may be a runner's staging link; what it names must be a small regular file
        status = TrainStatus.from_json(loads_strict(read_regular(path, MAX_RECORD_BYTES, follow_links=True)))
    except (UnsafeFile, MalformedJSON) as exc:
        return name, None, f"its status file {exc}"
    except RecordError as exc:
        return name, None, f"its status file is not valid ({exc})"
    if status.facility != name:
        return name, None, f"its status file says it comes from {status.facility!r}"
    if round_number is not None and status.round != round_number:
        return name, None, f"its status file is for round {status.round}"
    return name, status, None


def left_out_of(entries: list[str], round_number: int | None) -> list[LeftOut]:
    """`NAME@ROUND: REASON` entries (the orchestrator left NAME out of ROUND) for this round."""
    out = []
    for entry in entries:
        head, _, reason = entry.partition(":")
        name, at, rnd = head.strip().partition("@")
        if not at or not UPDATE_NAME.fullmatch(name) or not rnd.strip().isdigit():
            raise InputError(f"--left-out {entry!r:.100}: give NAME@ROUND: REASON")
        if round_number is None or int(rnd) == round_number:
            out.append(LeftOut(name, reason.strip()[:500] or "left out by the orchestrator"))
    return out
