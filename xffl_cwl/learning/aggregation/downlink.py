"""The round's change as the facilities receive it, written while the new global model is streamed.

The new global model is defined as the current one plus the change the facilities decode, so their
copies equal it bit for bit. With a lossy encoding (bf16, int8), what the encoding did not carry
(and what storing the result in the model's dtype rounded off) is kept in the server state as the
residual and added to the next round's change: error feedback, so no part of an update is lost.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from xffl_cwl.contract.records import json_text
from xffl_cwl.errors import InputError
from xffl_cwl.learning.deltas import low_rank_rows
from xffl_cwl.learning.model_change import CHANGE_JSON, FACTORS_STEM, ChangeRecord, ChangeWriter, factor_names
from xffl_cwl.learning.safetensors_stream import (
    Checkpoint,
    ShardWriter,
    TensorReader,
    TensorSpec,
    from_f32,
    read_checkpoint,
    to_f32,
)

RESIDUAL_STEM = "downlink_residual"


class Downlink:
    """The change of every stepped tensor, encoded (full fine-tuning, and LoRA with other strategies)."""

    kind = "delta"

    def __init__(self, directory: Path, encoding: str, residual: Checkpoint | None, state_dir: Path | None) -> None:
        self.directory, self.encoding, self.residual, self.state_dir = directory, encoding, residual, state_dir
        self.writer: ChangeWriter | None = None
        self.residual_out: ShardWriter | None = None

    @property
    def lossy(self) -> bool:
        return self.encoding != "fp32"

    @property
    def sent_encoding(self) -> str:
        return self.encoding

    def open(self, specs: list[TensorSpec]) -> None:
        """Lay out the change (and the residual) for the tensors the round steps."""
        if self.residual is not None:
            for spec in specs:
                entry = self.residual.by_name.get(spec.name)
                if entry is not None and (entry.shape != spec.shape or entry.dtype != "F32"):
                    raise InputError(
                        f"--state: residual of {spec.name!r} does not match the model; start without --state"
                    )
        self.writer = ChangeWriter(self.directory, specs, self.encoding)
        if self.lossy and self.state_dir is not None:
            self.residual_out = ShardWriter(
                self.state_dir / f"{RESIDUAL_STEM}.safetensors",
                [TensorSpec(s.name, "F32", s.shape) for s in specs],
                hashed=False,
            )

    def send(
        self, spec: TensorSpec, start: int, current: np.ndarray, new: np.ndarray, reader: TensorReader
    ) -> np.ndarray:
        """The stored values of a chunk of the new model: current plus what the facilities will decode."""
        assert self.writer is not None
        wanted = new - current
        entry = self.residual.by_name.get(spec.name) if self.residual is not None else None
        if self.lossy and entry is not None:
            wanted += reader.read(entry, start, wanted.size)
        sent = self.writer.apply(spec.name, wanted, start)
        stored = from_f32(current + sent, spec.dtype)
        if self.residual_out is not None:
            self.residual_out.write(spec.name, wanted - (to_f32(stored, spec.dtype) - current))
        return stored

    def close_residual(self) -> int:
        if self.residual_out is None:
            return 0
        self.residual_out.close()
        return self.residual_out.bytes_written

    def close(self, record: ChangeRecord) -> int:
        assert self.writer is not None
        return self.writer.close(record)


def load_residual(state: Path | None) -> Checkpoint | None:
    """The previous round's residual, when its state has one."""
    if state is None or not (Path(state) / f"{RESIDUAL_STEM}.safetensors").is_file():
        return None
    return read_checkpoint(Path(state), RESIDUAL_STEM)


class LowRankDownlink:
    """Exact LoRA merged with fedavg: each adapted weight changes by lr * sum_i w_i c_i s_i B_i A_i, whose
    rank is at most the sum of the members' ranks; it is sent as its factors B (out x R) and A (R x in).

    All factors are written first (one tensor's at a time in memory), then every chunk of the new
    model is current + low_rank_rows(B rows, A), the very computation a facility repeats."""

    kind = "low_rank"
    sent_encoding = "fp32"

    def __init__(self, directory: Path, server_lr: float) -> None:
        self.directory, self.server_lr = Path(directory), server_lr
        self.members: list = []
        self.reader: TensorReader | None = None
        self.factors: Checkpoint | None = None
        self._a: tuple[str, np.ndarray] | None = None  # the A of the tensor being streamed

    def bind(self, members: list, reader: TensorReader) -> None:
        """The round's members (weights and clipping known) and the reader of their adapters."""
        self.members, self.reader = members, reader

    def _factors_of(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        assert self.reader is not None
        bs, as_ = [], []
        for m in self.members:
            module = m.update.modules.get(name)
            if module is None:
                continue
            b = to_f32(self.reader.read(module.b), module.b.dtype).reshape(module.b.shape)
            a = to_f32(self.reader.read(module.a), module.a.dtype).reshape(module.a.shape)
            bs.append(b * np.float32(self.server_lr * m.weight * m.clip * module.scale))
            as_.append(a)
        return np.ascontiguousarray(np.hstack(bs)), np.ascontiguousarray(np.vstack(as_))

    def open(self, specs: list[TensorSpec]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        ranks = {
            s.name: sum(m.update.modules[s.name].rank for m in self.members if s.name in m.update.modules)
            for s in specs
        }
        layout = []
        for s in specs:
            b_name, a_name = factor_names(s.name)
            layout += [
                TensorSpec(b_name, "F32", (s.shape[0], ranks[s.name])),
                TensorSpec(a_name, "F32", (ranks[s.name], s.shape[1])),
            ]
        writer = ShardWriter(self.directory / f"{FACTORS_STEM}.safetensors", layout, hashed=False)
        for s in specs:
            b, a = self._factors_of(s.name)
            b_name, a_name = factor_names(s.name)
            writer.write(b_name, b)
            writer.write(a_name, a)
        writer.close()
        self.factors = read_checkpoint(self.directory, FACTORS_STEM)

    def send(
        self, spec: TensorSpec, start: int, current: np.ndarray, new: np.ndarray, reader: TensorReader
    ) -> np.ndarray:
        assert self.factors is not None
        b_entry, a_entry = (self.factors.by_name[n] for n in factor_names(spec.name))
        if self._a is None or self._a[0] != spec.name:
            self._a = (spec.name, reader.read(a_entry).reshape(a_entry.shape))
        cols, rank = spec.shape[1], b_entry.shape[1]
        b = reader.read(b_entry, start // cols * rank, current.size // cols * rank).reshape(-1, rank)
        return from_f32(current + low_rank_rows(b, self._a[1]).reshape(-1), spec.dtype)

    def close_residual(self) -> int:
        return 0

    def close(self, record: ChangeRecord) -> int:
        (self.directory / CHANGE_JSON).write_text(json_text(record.to_json()))
        return sum(p.stat().st_size for p in self.directory.iterdir())
