"""Client updates: read them (safetensors and JSON only) and check each against the round.

Every check raises `Rejected` with the facility and a one-line reason naming the tensor or the
field at fault; screening reports it and carries on with the remaining updates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from xffl_cwl.contract.layout import UPDATE_JSON
from xffl_cwl.contract.records import RecordError, UpdateRecord
from xffl_cwl.errors import InputError
from xffl_cwl.learning.aggregation.lora import LoraModule, UnsupportedAdapter, adapter_modules
from xffl_cwl.learning.model_dir import ADAPTER_CONFIG, ADAPTER_STEM, MODEL_STEM, read_json
from xffl_cwl.learning.safetensors_stream import Checkpoint, TensorReader, read_checkpoint, row_chunks


class Rejected(Exception):
    """An update that must not be used; `reason` is one line."""

    def __init__(self, facility: str, path: Path, reason: str) -> None:
        super().__init__(f"update from facility {facility!r} ({path}) rejected: {reason}")
        self.facility = facility
        self.path = path
        self.reason = reason


@dataclass
class Update:
    path: Path
    record: UpdateRecord
    checkpoint: Checkpoint
    adapter_config: dict[str, Any] | None = None
    modules: dict[str, LoraModule] = field(default_factory=dict)

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


def load_update(path: Path) -> Update:
    """Parse update.json and the weight headers; no tensor data is read yet."""
    path = Path(path)
    label = path.name
    if not path.is_dir():
        raise Rejected(label, path, "not a directory")
    try:
        data = read_json(path / UPDATE_JSON, "an xffl-cwl update directory")
    except InputError as exc:
        raise Rejected(label, path, str(exc)) from exc
    try:
        record = UpdateRecord.from_json(data)
    except RecordError as exc:
        facility = data.get("facility") if isinstance(data.get("facility"), str) and data.get("facility") else label
        raise Rejected(facility[:64], path, str(exc)) from exc
    try:
        ckpt = read_checkpoint(path, MODEL_STEM if record.mode == "full" else ADAPTER_STEM)
        update = Update(path, record, ckpt)
        if record.mode == "lora":
            update.adapter_config = read_json(path / ADAPTER_CONFIG, "a PEFT adapter directory")
            update.modules = adapter_modules(ckpt, update.adapter_config)
    except (InputError, UnsupportedAdapter) as exc:
        raise Rejected(record.facility, path, str(exc)) from exc
    return update


def check_same_layout(update: Update, reference: Checkpoint, what: str) -> None:
    """Same tensor names, shapes and dtypes as `reference` (the global model or global adapter)."""
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
        raise update.reject(f"tensor {extra[0]!r} is not in the {what}")


def check_adapter_fits(update: Update, base: Checkpoint) -> None:
    """Every adapted module exists in the base model with the shape B @ A produces."""
    for base_name, module in update.modules.items():
        target = base.by_name.get(base_name)
        if target is None:
            raise update.reject(f"tensor {module.a.name!r} adapts {base_name!r}, which the global model does not have")
        if target.shape != (module.b.shape[0], module.a.shape[1]):
            raise update.reject(
                f"tensors {module.a.name!r}/{module.b.name!r} give a {module.b.shape[0]}x{module.a.shape[1]} change, "
                f"but {base_name!r} is {'x'.join(map(str, target.shape))}"
            )
        if not module.a.is_float or not module.b.is_float:
            raise update.reject(f"tensor {module.a.name!r} is not floating point")


def check_finite(update: Update, reader: TensorReader, chunk_elems: int) -> None:
    """Read every float tensor once, in bounded chunks; NaN or Inf anywhere rejects the update."""
    for entry in update.checkpoint.entries():
        if not entry.is_float:
            continue
        for start, count in row_chunks(entry.shape, chunk_elems):
            if not torch.isfinite(reader.read(entry, start, count)).all():
                raise update.reject(f"tensor {entry.name!r} holds NaN or Inf values")


def check_weighting(updates: list[Update], weighting: str) -> list[float]:
    """Normalised weights; an update whose weight would be zero cannot be averaged in."""
    if weighting == "uniform":
        raw = [1.0] * len(updates)
    else:
        raw = [float(u.samples if weighting == "samples" else u.tokens) for u in updates]
    total = sum(raw)
    if not total > 0 or not math.isfinite(total):
        raise InputError(f"updates carry no {weighting} to weight them by; use --weighting uniform")
    return [r / total for r in raw]
