"""Merge plans: for every output tensor, where its value comes from.

A tensor is either copied from the global model or stepped towards a target: the combination of
the members' values (full updates, FedIT adapters) or the global weight plus the combination of
their LoRA changes. Targets work chunk by chunk, so memory stays bounded, and check what they
read: a member whose values are not finite raises UpdateFault, which rejects that member only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from xffl_cwl.learning.aggregation.lora import NotFinite, change_norm_sq
from xffl_cwl.learning.aggregation.robust import Rule
from xffl_cwl.learning.aggregation.screening import GlobalModel
from xffl_cwl.learning.aggregation.updates import Update
from xffl_cwl.learning.deltas import decode, scale_range
from xffl_cwl.learning.model_dir import ADAPTER_STEM, ADAPTER_SUBDIR
from xffl_cwl.learning.safetensors_stream import Checkpoint, TensorEntry, TensorReader, TensorSpec, row_chunks, to_f32


class UpdateFault(Exception):
    """One member spoils the merge (its values, or what they do to the result); the round is redone without it."""

    def __init__(self, update: Update, reason: str) -> None:
        super().__init__(reason)
        self.update = update
        self.reason = reason


@dataclass
class Member:
    """An update taking part in the merge: its normalised weight and its norm-clipping factor (1: unclipped)."""

    update: Update
    weight: float
    clip: float = 1.0

    @property
    def facility(self) -> str:
        return self.update.facility


@dataclass
class Norms:
    """Squared L2 norms accumulated chunk by chunk."""

    per_facility: dict[str, float] = field(default_factory=dict)
    update: float = 0.0

    def add(self, facility: str, value: float) -> None:
        self.per_facility[facility] = self.per_facility.get(facility, 0.0) + value


def sq_norm(x: np.ndarray) -> float:
    """Squared L2 norm of a flat chunk: one fp32 pass; float64 only if fp32 overflows. NaN if x holds NaN/Inf."""
    value = float(np.dot(x, x))
    if value == float("inf"):
        wide = x.astype(np.float64)
        value = float(np.dot(wide, wide))
    return value


def all_finite(x: np.ndarray) -> bool:
    """No NaN or Inf in x: a sum is finite when its terms are (one pass); a non-finite sum is checked exactly."""
    return math.isfinite(float(x.sum())) or bool(np.isfinite(x).all())


def _reweighted(members: list[Member]) -> list[Member]:
    total = sum(m.weight for m in members)
    return [Member(m.update, m.weight / total, m.clip) for m in members] if total > 0 else members


class Scratch:
    """One float32 buffer the merge reuses for every member's chunk: no page faults per chunk."""

    def __init__(self) -> None:
        self._buffer = np.empty(0, dtype=np.float32)

    def get(self, count: int) -> np.ndarray:
        if self._buffer.size < count:
            self._buffer = np.empty(count, dtype=np.float32)
        return self._buffer[:count]


class ValueTarget:
    """The members' own values of a tensor (full weights, FedIT A and B), combined by the rule."""

    def __init__(
        self, name: str, members: list[Member], reader: TensorReader, norms: Norms, rule: Rule, scratch: Scratch
    ) -> None:
        self.name, self.members, self.reader, self.norms, self.rule = name, members, reader, norms, rule
        self.scratch = scratch

    def _read(self, member: Member, start: int, count: int, reuse: bool = False) -> np.ndarray:
        """The member's values as float32; with `reuse`, in the shared scratch buffer when stored as F32."""
        entry = member.update.checkpoint.by_name[self.name]
        return to_f32(self.reader.read(entry, start, count, self.scratch.get(count) if reuse else None), entry.dtype)

    def _change(self, member: Member, start: int, count: int, current: np.ndarray, reuse: bool = False) -> np.ndarray:
        """The member's change to these elements, float32: its values minus the current ones, or the
        change it sent encoded (bf16, int8: learning/deltas.py). With `reuse`, in the scratch buffer."""
        encoding = member.update.encoding
        if encoding == "fp32":
            values = self._read(member, start, count, reuse=reuse)
            return np.subtract(values, current, out=values if reuse else None)
        update = member.update
        stored = self.reader.read(update.checkpoint.by_name[self.name], start, count)
        scales = None
        if update.scales is not None:
            first, blocks = scale_range(start, count)
            scales = self.reader.read(update.scales.by_name[self.name], first, blocks)
        return decode(stored, scales, encoding, start)

    def _mean_of_changes(
        self, start: int, count: int, current: np.ndarray, members: list[Member], counted: bool
    ) -> np.ndarray:
        """current + sum of w * (values - current): each member's values read once into one reused buffer,
        their change checked finite through its norm, which the record needs anyway."""
        acc = np.zeros(count, dtype=np.float32)
        for m in members:
            delta = self._change(m, start, count, current, reuse=True)
            distance = sq_norm(delta)
            if not math.isfinite(distance):
                raise self._fault(m)
            if counted:
                self.norms.add(m.facility, distance)
            delta *= np.float32(m.weight * m.clip)
            acc += delta
        acc += current
        return acc

    def _fault(self, member: Member) -> UpdateFault:
        return UpdateFault(member.update, f"tensor {self.name!r} holds NaN or Inf values")

    def _checked(self, member: Member, start: int, count: int, current: np.ndarray | None, counted: bool) -> np.ndarray:
        """The member's values for these elements, checked finite (through their distance from the current
        ones, which the update norm needs anyway), and clipped when the member's change is."""
        if current is None:
            values = self._read(member, start, count)
            if not all_finite(values):
                raise self._fault(member)
            return values
        delta = self._change(member, start, count, current)
        distance = sq_norm(delta)
        if not math.isfinite(distance):
            raise self._fault(member)
        if counted:
            self.norms.add(member.facility, distance)
        if member.clip < 1.0:
            delta *= member.clip
        delta += current
        return delta

    def mean(
        self, start: int, count: int, current: np.ndarray | None, members: list[Member] | None = None
    ) -> np.ndarray:
        counted = members is None
        members = self.members if members is None else members
        if self.rule.kind == "mean" and current is not None:
            return self._mean_of_changes(start, count, current, members, counted)
        if self.rule.kind == "mean":
            acc = None
            for m in members:
                values = self._checked(m, start, count, current, counted)
                values *= np.float32(m.weight)
                if acc is None:
                    acc = values
                else:
                    acc += values
            return acc if acc is not None else np.zeros(count, dtype=np.float32)
        return self.rule.robust([self._checked(m, start, count, current, counted) for m in members])

    def change(self, member: Member, start: int, count: int, current: np.ndarray | None) -> np.ndarray:
        """What this member alone would move these elements by (its values, where nothing is there yet)."""
        values = self._read(member, start, count) if current is None else self._change(member, start, count, current)
        if not all_finite(values):
            raise self._fault(member)
        return values

    def delta_sq(self, member: Member, current_entry: TensorEntry | None, chunk_elems: int) -> float:
        """The member's squared distance from the current values over the whole tensor."""
        entry = member.update.checkpoint.by_name[self.name]
        total = 0.0
        for start, count in row_chunks(entry.shape, chunk_elems):
            if current_entry is None:
                values = self._read(member, start, count)
            else:
                current = to_f32(self.reader.read(current_entry, start, count), current_entry.dtype)
                values = self._change(member, start, count, current)
            distance = sq_norm(values)
            if not math.isfinite(distance):
                raise self._fault(member)
            total += distance
        return total


class LoraTarget:
    """The global weight plus the combination of the members' exact changes scale * B @ A."""

    def __init__(
        self, base: TensorEntry, members: list[Member], reader: TensorReader, norms: Norms, rule: Rule, chunk_elems: int
    ) -> None:
        self.base, self.members, self.reader, self.norms, self.rule = base, members, reader, norms, rule
        self.block_rows = max(1, chunk_elems // base.shape[1])  # rows of A read at once: bounds memory at any rank

    def _delta(self, member: Member, start: int, count: int) -> np.ndarray | None:
        module = member.update.modules.get(self.base.name)
        if module is None:
            return None
        cols, rank = self.base.shape[1], module.rank
        first_row, rows = start // cols, count // cols
        b = to_f32(self.reader.read(module.b, first_row * rank, rows * rank), module.b.dtype).reshape(rows, rank)
        delta = None
        for k in range(0, rank, self.block_rows):
            kb = min(self.block_rows, rank - k)
            a = to_f32(self.reader.read(module.a, k * cols, kb * cols), module.a.dtype).reshape(kb, cols)
            part = b[:, k : k + kb] @ a if kb < rank else b @ a
            if delta is None:
                delta = part
            else:
                delta += part
        assert delta is not None
        delta *= np.float32(module.scale)
        return delta.reshape(-1)

    def _checked(self, member: Member, start: int, count: int, counted: bool) -> np.ndarray | None:
        """The member's change to these elements, checked finite through its norm (which is recorded)."""
        delta = self._delta(member, start, count)
        if delta is None:
            return None
        distance = sq_norm(delta)
        if not math.isfinite(distance):
            raise UpdateFault(
                member.update, f"its change to {self.base.name!r} is not finite (NaN, Inf or overflowing lora_A/lora_B)"
            )
        if counted:
            self.norms.add(member.facility, distance)
        if member.clip < 1.0:
            delta *= np.float32(member.clip)
        return delta

    def mean(
        self, start: int, count: int, current: np.ndarray | None, members: list[Member] | None = None
    ) -> np.ndarray:
        assert current is not None
        counted = members is None
        members = self.members if members is None else members
        if self.rule.kind == "mean":
            acc = current.copy()
            for m in members:
                delta = self._checked(m, start, count, counted)
                if delta is not None:
                    delta *= np.float32(m.weight)
                    acc += delta
            return acc
        deltas = [self._checked(m, start, count, counted) for m in members]
        return current + self.rule.robust([np.zeros(count, dtype=np.float32) if d is None else d for d in deltas])

    def change(self, member: Member, start: int, count: int, current: np.ndarray | None) -> np.ndarray:
        delta = self._checked(member, start, count, counted=False)
        return np.zeros(count, dtype=np.float32) if delta is None else delta

    def delta_sq(self, member: Member, current_entry: TensorEntry | None, chunk_elems: int) -> float:
        module = member.update.modules.get(self.base.name)
        if module is None:
            return 0.0
        try:
            return change_norm_sq(module, self.reader, chunk_elems)
        except NotFinite as exc:
            raise UpdateFault(member.update, f"tensor {str(exc)!r} holds NaN or Inf values") from None


Target = ValueTarget | LoraTarget


@dataclass
class TensorPlan:
    """How one output tensor gets its value: copied from `current`, or stepped towards `target`."""

    spec: TensorSpec
    current: TensorEntry | None
    target: Target | None = None


@dataclass
class OutputShard:
    relpath: str
    metadata: dict[str, str]
    plans: list[TensorPlan]


def _model_plan(ckpt: Checkpoint, targets: dict[str, Target]) -> list[OutputShard]:
    """The global model's own layout, each tensor stepped if it has a target, copied otherwise."""
    return [
        OutputShard(
            shard.relpath,
            shard.metadata,
            [
                TensorPlan(TensorSpec(e.name, e.dtype, e.shape), e, targets.get(e.name) if e.is_float else None)
                for e in shard.entries
            ],
        )
        for shard in ckpt.shards
    ]


def full_plan(
    glob: GlobalModel, members: list[Member], reader: TensorReader, norms: Norms, rule: Rule, chunk_elems: int
) -> list[OutputShard]:
    scratch = Scratch()
    targets = {e.name: ValueTarget(e.name, members, reader, norms, rule, scratch) for e in glob.checkpoint.entries()}
    return _model_plan(glob.checkpoint, targets)


def exact_lora_plan(
    glob: GlobalModel, members: list[Member], reader: TensorReader, norms: Norms, rule: Rule, chunk_elems: int
) -> list[OutputShard]:
    adapted = {name for m in members for name in m.update.modules}
    targets = {
        name: LoraTarget(glob.checkpoint.by_name[name], members, reader, norms, rule, chunk_elems) for name in adapted
    }
    return _model_plan(glob.checkpoint, targets)


def fedit_plan(
    glob: GlobalModel, members: list[Member], reader: TensorReader, norms: Norms, rule: Rule, chunk_elems: int
) -> list[OutputShard]:
    """FedIT: the base is copied, the adapter's A and B are combined separately."""
    reference = glob.adapter or members[0].update.checkpoint
    scratch = Scratch()
    adapter_plans = [
        TensorPlan(
            TensorSpec(e.name, e.dtype, e.shape),
            glob.adapter.by_name[e.name] if glob.adapter else None,
            ValueTarget(e.name, members, reader, norms, rule, scratch),
        )
        for e in reference.entries()
    ]
    shard_meta = reference.shards[0].metadata if len(reference.shards) == 1 else {"format": "pt"}
    adapter = OutputShard(f"{ADAPTER_SUBDIR}/{ADAPTER_STEM}.safetensors", shard_meta, adapter_plans)
    return [*_model_plan(glob.checkpoint, {}), adapter]


def without(members: list[Member], facility: str) -> list[Member]:
    return _reweighted([m for m in members if m.facility != facility])
