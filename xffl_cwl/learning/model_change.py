"""The change of the global model in one round, as a directory a facility applies to its own copy.

A facility keeps the global model it trained from; the next round it receives only this change
and rebuilds the new global model from it, bit for bit: the aggregator defines the new global
model as exactly what applying the change gives (see ChangeWriter), and the facility checks the
result's fingerprint. Layout (Hugging Face style, one directory):

    change.json               format, kind, encoding, round, the base and the result's fingerprints
    delta.safetensors         kind "delta": the change of every tensor that changed, encoded (deltas.py)
    delta_scales.safetensors  with int8: each tensor's block scales
    factors.safetensors       kind "low_rank" (exact LoRA with fedavg): per changed tensor T, `T::B`
                              (out x R) and `T::A` (R x in), the change being B @ A (deltas.low_rank_rows)
    adapter/                  kind "adapter" (FedIT): the new global adapter; the base never changes
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xffl_cwl.atomic import atomic_dir
from xffl_cwl.contract.records import json_text
from xffl_cwl.errors import InputError
from xffl_cwl.learning.deltas import (
    ENCODINGS,
    STORED_CODE,
    block_count,
    decode,
    encode,
    low_rank_rows,
    scale_range,
)
from xffl_cwl.learning.model_dir import (
    ADAPTER_SUBDIR,
    MODEL_STEM,
    copy_side_files,
    fingerprint,
    has_adapter,
    read_json,
    weight_files,
)
from xffl_cwl.learning.safetensors_stream import (
    ShardWriter,
    TensorEntry,
    TensorReader,
    TensorSpec,
    from_f32,
    read_checkpoint,
    row_chunks,
    specs_of,
    to_f32,
)

CHANGE_JSON = "change.json"
CHANGE_FORMAT = "xffl-change"
DELTA_STEM = "delta"
SCALES_STEM = "delta_scales"
FACTORS_STEM = "factors"
KINDS = ("delta", "low_rank", "adapter")


def factor_names(name: str) -> tuple[str, str]:
    """The names of tensor `name`'s low-rank factors B and A in factors.safetensors."""
    return f"{name}::B", f"{name}::A"


@dataclass(frozen=True)
class ChangeRecord:
    """change.json: what the change turns into what."""

    kind: str
    encoding: str
    round: int | None
    base_fingerprint: str
    fingerprint: str

    def to_json(self) -> dict:
        return {
            "format": CHANGE_FORMAT,
            "version": 1,
            "kind": self.kind,
            "encoding": self.encoding,
            "round": self.round,
            "base_fingerprint": self.base_fingerprint,
            "fingerprint": self.fingerprint,
        }

    @classmethod
    def read(cls, directory: Path) -> ChangeRecord:
        data = read_json(Path(directory) / CHANGE_JSON, "a model change (the aggregate step's change/)")
        if data.get("format") != CHANGE_FORMAT:
            raise InputError(f"{directory}/{CHANGE_JSON} is not an xffl-cwl model change")
        kind, encoding = data.get("kind"), data.get("encoding")
        fps = data.get("base_fingerprint"), data.get("fingerprint")
        if kind not in KINDS or encoding not in ENCODINGS or not all(isinstance(f, str) for f in fps):
            raise InputError(f"{directory}/{CHANGE_JSON} has an unknown kind or encoding, or no fingerprints")
        round_number = data.get("round")
        return cls(kind, encoding, round_number if isinstance(round_number, int) else None, fps[0], fps[1])


class ChangeWriter:
    """Streams a round's change while the aggregator streams the new global model.

    `apply` takes the change the strategy wants for a chunk and returns the change the facilities
    will apply (the decoded encoding), which the aggregator adds to the current values instead; with
    a lossy encoding, what was not sent is the chunk's residual, added to the next round's change."""

    def __init__(self, directory: Path, specs: list[TensorSpec], encoding: str) -> None:
        self.directory, self.encoding = Path(directory), encoding
        self.directory.mkdir(parents=True, exist_ok=True)
        self.values = ShardWriter(
            self.directory / f"{DELTA_STEM}.safetensors",
            [TensorSpec(s.name, STORED_CODE[encoding], s.shape) for s in specs],
            hashed=False,
        )
        self.scales = (
            ShardWriter(
                self.directory / f"{SCALES_STEM}.safetensors",
                [TensorSpec(s.name, "F32", (block_count(math.prod(s.shape)),)) for s in specs],
                hashed=False,
            )
            if encoding == "int8"
            else None
        )

    def apply(self, name: str, change: np.ndarray, start: int) -> np.ndarray:
        values, scales = encode(change, self.encoding)
        self.values.write(name, values)
        if self.scales is not None and scales is not None:
            self.scales.write(name, scales)
        return change if self.encoding == "fp32" else decode(values, scales, self.encoding, start)

    def close_files(self) -> int:
        """Finish the files; returns the bytes written."""
        self.values.close()
        written = self.values.bytes_written
        if self.scales is not None:
            self.scales.close()
            written += self.scales.bytes_written
        return written

    def close(self, record: ChangeRecord) -> int:
        """Finish the files and write change.json; returns the bytes written."""
        written = self.close_files()
        (self.directory / CHANGE_JSON).write_text(json_text(record.to_json()))
        return written


def write_adapter_change(directory: Path, new_model: Path, record: ChangeRecord) -> None:
    """FedIT: the change is the new global adapter; the facility keeps the base it already has."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copytree(Path(new_model) / ADAPTER_SUBDIR, directory / ADAPTER_SUBDIR)
    (directory / CHANGE_JSON).write_text(json_text(record.to_json()))


def link_or_copy(src: Path, dst: Path) -> None:
    """A hard link where the file system allows one (no bytes written), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _copy_model(src: Path, dst: Path, with_adapter: bool = True) -> None:
    for rel in weight_files(src):
        if not with_adapter and rel.startswith(f"{ADAPTER_SUBDIR}/"):
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        link_or_copy(src / rel, dst / rel)
    for path in Path(src).glob("*.index.json"):
        link_or_copy(path, dst / path.name)
    copy_side_files(src, dst)


Step = Callable[[TensorEntry, int, int, TensorReader], "np.ndarray | None"]


def _rewrite(local: Path, out: Path, chunk_elems: int, step_of: Step) -> None:
    """The local model with every chunk that `step_of` changes moved by it (in float32, stored back in its
    dtype), every other chunk copied; layout, index and side files as they are."""
    ckpt = read_checkpoint(local, MODEL_STEM)
    with TensorReader() as reader:
        for shard in ckpt.shards:
            (out / shard.relpath).parent.mkdir(parents=True, exist_ok=True)
            writer = ShardWriter(out / shard.relpath, specs_of(shard.entries), shard.metadata, hashed=False)
            for entry in shard.entries:
                for start, count in row_chunks(entry.shape, chunk_elems):
                    stored = reader.read(entry, start, count)
                    step = step_of(entry, start, count, reader)
                    writer.write(
                        entry.name,
                        stored if step is None else from_f32(to_f32(stored, entry.dtype) + step, entry.dtype),
                    )
            writer.close()
    for path in Path(local).glob("*.index.json"):
        shutil.copy2(path, out / path.name)
    copy_side_files(local, out)


def _apply_low_rank(local: Path, change: Path, out: Path, chunk_elems: int) -> None:
    ckpt = read_checkpoint(local, MODEL_STEM)
    factors = read_checkpoint(change, FACTORS_STEM)
    changed: dict[str, tuple[TensorEntry, TensorEntry]] = {}
    for entry in ckpt.entries():
        b_name, a_name = factor_names(entry.name)
        if b_name not in factors.by_name:
            continue
        b, a = factors.by_name[b_name], factors.by_name.get(a_name)
        if (
            a is None
            or len(entry.shape) != 2
            or b.shape[0] != entry.shape[0]
            or a.shape != (b.shape[1], entry.shape[1])
        ):
            raise InputError(f"{change}: the factors of {entry.name!r} do not fit the local model")
        changed[entry.name] = (b, a)
    if 2 * len(changed) != len(factors.by_name):
        raise InputError(f"{change}: factors for tensors the local model does not have")
    held: dict[str, np.ndarray] = {}  # the A of the tensor being rewritten (R x in: small)

    def step_of(entry: TensorEntry, start: int, count: int, reader: TensorReader) -> np.ndarray | None:
        pair = changed.get(entry.name)
        if pair is None:
            return None
        b_entry, a_entry = pair
        if entry.name not in held:
            held.clear()
            held[entry.name] = reader.read(a_entry).reshape(a_entry.shape)
        cols, rank = entry.shape[1], b_entry.shape[1]
        b = reader.read(b_entry, start // cols * rank, count // cols * rank).reshape(-1, rank)
        return low_rank_rows(b, held[entry.name]).reshape(-1)

    _rewrite(local, out, chunk_elems, step_of)


def _apply_delta(local: Path, change: Path, out: Path, encoding: str, chunk_elems: int) -> None:
    if has_adapter(local):
        raise InputError(f"{local} carries an adapter, but the change {change} is a delta of the whole model")
    ckpt = read_checkpoint(local, MODEL_STEM)
    delta = read_checkpoint(change, DELTA_STEM)
    scales = read_checkpoint(change, SCALES_STEM) if encoding == "int8" else None
    for name, entry in delta.by_name.items():
        base = ckpt.by_name.get(name)
        if base is None or base.shape != entry.shape or entry.dtype != STORED_CODE[encoding] or not base.is_float:
            raise InputError(f"{change}: tensor {name!r} does not match the local model (name, shape or dtype)")
        if scales is not None and (name not in scales.by_name or scales.by_name[name].numel != block_count(base.numel)):
            raise InputError(f"{change}: tensor {name!r} has no block scales of the right size")

    def step_of(entry: TensorEntry, start: int, count: int, reader: TensorReader) -> np.ndarray | None:
        changed = delta.by_name.get(entry.name)
        if changed is None:
            return None
        chunk_scales = None
        if scales is not None:
            first, blocks = scale_range(start, count)
            chunk_scales = reader.read(scales.by_name[entry.name], first, blocks)
        return decode(reader.read(changed, start, count), chunk_scales, encoding, start)

    _rewrite(local, out, chunk_elems, step_of)


UPLINK_DIR = "uplink"  # in a facility's copy: what its encoded updates have not sent yet (error feedback)
UPLINK_RESIDUAL = "residual"


def _carry_uplink_state(local: Path, out: Path) -> None:
    """The facility's uplink residual follows its copy of the model from round to round."""
    (out / UPLINK_DIR).mkdir()
    residual = local / UPLINK_DIR / f"{UPLINK_RESIDUAL}.safetensors"
    if residual.is_file():
        link_or_copy(residual, out / UPLINK_DIR / residual.name)


def rebuild(local: Path, change: Path | None, out: Path, chunk_elems: int = 1 << 20) -> str:
    """Write the round's global model at `out` from the facility's copy `local` and the round's change.

    `local` may already be the round's model (a facility that was sent the whole model): it is then
    linked. Returns the result's fingerprint, checked against the change's."""
    local, out = Path(local), Path(out)
    current = fingerprint(local)
    with atomic_dir(out) as tmp:
        _carry_uplink_state(local, tmp)
        if change is None:
            _copy_model(local, tmp)
            return current
        record = ChangeRecord.read(change)
        if current == record.fingerprint:
            _copy_model(local, tmp)
            return current
        if current != record.base_fingerprint:
            raise InputError(
                f"--model {local} is neither the model the change {change} starts from nor its result; "
                "pass the facility's copy of the previous global model or the current one"
            )
        if record.kind == "adapter":
            _copy_model(local, tmp, with_adapter=False)
            shutil.copytree(Path(change) / ADAPTER_SUBDIR, tmp / ADAPTER_SUBDIR, dirs_exist_ok=True)
        elif record.kind == "low_rank":
            _apply_low_rank(local, Path(change), tmp, chunk_elems)
        else:
            _apply_delta(local, Path(change), tmp, record.encoding, chunk_elems)
        result = fingerprint(tmp)
        if result != record.fingerprint:
            raise InputError(
                f"applying the change {change} to {local} gave {result}, not the global model {record.fingerprint}; "
                "the facility's copy or the change is damaged"
            )
        return result
