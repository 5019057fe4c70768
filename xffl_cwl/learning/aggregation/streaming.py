"""Write the planned outputs chunk by chunk: the next global model and the server-optimizer state.

Each output file's header is laid out before any data is read; every tensor is processed in row
chunks, the strategy steps each chunk with that chunk's state, and both are appended in order.
Every stepped chunk and its state must be finite: when one is not, the member whose change is
largest there is left out of that chunk; if that makes it finite the member is to blame
(UpdateFault), otherwise the settings are (NonFiniteOutput).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from xffl_cwl.learning.aggregation.downlink import Downlink
from xffl_cwl.learning.aggregation.plans import (
    Member,
    Norms,
    OutputShard,
    TensorPlan,
    UpdateFault,
    all_finite,
    sq_norm,
    without,
)
from xffl_cwl.learning.aggregation.server_state import ServerState
from xffl_cwl.learning.aggregation.strategies import ServerOptimizer
from xffl_cwl.learning.deltas import aligned_chunks
from xffl_cwl.learning.safetensors_stream import ShardWriter, TensorReader, TensorSpec, from_f32, row_chunks, to_f32


class NonFiniteOutput(Exception):
    """A merged tensor (or its optimizer state) is not finite, and no single update causes it."""

    def __init__(self, tensor: str) -> None:
        super().__init__(tensor)
        self.tensor = tensor


def _finite(new: np.ndarray, state: dict[str, np.ndarray]) -> bool:
    return all_finite(new) and all(all_finite(s) for s in state.values())


def stream(
    shards: list[OutputShard],
    out: Path,
    state_dir: Path | None,
    strategy: ServerOptimizer,
    old_state: ServerState,
    reader: TensorReader,
    chunk_elems: int,
    norms: Norms,
    members: list[Member],
    downlink: Downlink | None = None,
    background_hash: bool = True,
) -> tuple[dict[str, str], list[str], int]:
    """Write every output tensor and the new optimizer state; returns digests, state tensor names, bytes written.

    With `downlink`, every stepped chunk's change is also encoded for the facilities, and the new
    value is the current one plus the change they will decode, so their copies equal this model."""
    stepped = [p for s in shards for p in s.plans if p.target is not None]
    if downlink is not None:
        downlink.open([p.spec for p in stepped])
    names = [p.spec.name for p in stepped]
    stepped_names = set(names)
    carried = [n for n in old_state.names() if n not in stepped_names]
    slots = strategy.info.slots
    slot_writers: dict[str, ShardWriter] = {}
    if state_dir is not None:
        specs = [TensorSpec(p.spec.name, "F32", p.spec.shape) for p in stepped]
        specs += [TensorSpec(n, "F32", old_state.slots[slots[0]].by_name[n].shape) for n in carried]
        slot_writers = {slot: ShardWriter(state_dir / f"{slot}.safetensors", specs, hashed=False) for slot in slots}
    digests: dict[str, str] = {}
    written = 0
    for shard in shards:
        (out / shard.relpath).parent.mkdir(parents=True, exist_ok=True)
        writer = ShardWriter(
            out / shard.relpath, [p.spec for p in shard.plans], shard.metadata, background=background_hash
        )
        for plan in shard.plans:
            chunks = aligned_chunks if downlink is not None and plan.target is not None else row_chunks
            for start, count in chunks(plan.spec.shape, chunk_elems):
                stored = reader.read(plan.current, start, count) if plan.current is not None else None
                if plan.target is None:
                    writer.write(plan.spec.name, stored)
                    continue
                current = to_f32(stored, plan.spec.dtype) if stored is not None else None
                mean = plan.target.mean(start, count, current)
                state = {slot: _state_chunk(old_state, slot, plan.spec.name, start, count, reader) for slot in slots}
                new = strategy.step(current if current is not None else mean, mean, state)
                if not _finite(new, state):
                    _blame(plan, start, count, current, strategy, old_state, reader, members)
                if current is not None:
                    norms.update += sq_norm(new - current)
                stored = from_f32(new, plan.spec.dtype)
                if downlink is not None and current is not None:
                    stored = downlink.send(plan.spec, start, current, new, reader)
                writer.write(plan.spec.name, stored)
                for slot, slot_writer in slot_writers.items():
                    slot_writer.write(plan.spec.name, state[slot])
        digests[shard.relpath] = writer.close()
        written += writer.bytes_written
    if downlink is not None:
        written += downlink.close_residual()
    for slot, slot_writer in slot_writers.items():
        for name in carried:
            entry = old_state.slots[slot].by_name[name]
            for start, count in row_chunks(entry.shape, chunk_elems):
                slot_writer.write(name, reader.read(entry, start, count))
        slot_writer.close()
        written += slot_writer.bytes_written
    return digests, names + carried, written


def _blame(
    plan: TensorPlan,
    start: int,
    count: int,
    current: np.ndarray | None,
    strategy: ServerOptimizer,
    old_state: ServerState,
    reader: TensorReader,
    members: list[Member],
) -> None:
    """Raise UpdateFault for the member that makes this chunk non-finite, or NonFiniteOutput if none does alone."""
    target = plan.target
    assert target is not None
    sizes = [(float(np.abs(target.change(m, start, count, current)).max()), m) for m in members]
    size, culprit = max(sizes, key=lambda pair: pair[0])
    rest = without(members, culprit.facility)
    if rest:
        mean = target.mean(start, count, current, rest)
    else:  # the only member: without it the step has nothing to do
        mean = current if current is not None else np.zeros(count, dtype=np.float32)
    state = {slot: _state_chunk(old_state, slot, plan.spec.name, start, count, reader) for slot in strategy.info.slots}
    if _finite(strategy.step(current if current is not None else mean, mean, state), state):
        raise UpdateFault(
            culprit.update,
            f"it makes tensor {plan.spec.name!r} of the next global model non-finite (its change there reaches {size:.3g})",
        )
    raise NonFiniteOutput(plan.spec.name)


def _state_chunk(state: ServerState, slot: str, name: str, start: int, count: int, reader: TensorReader) -> np.ndarray:
    """The previous round's slot values for these elements; zeros for a tensor seen for the first time."""
    ckpt = state.slots.get(slot)
    entry = ckpt.by_name.get(name) if ckpt is not None else None
    return reader.read(entry, start, count) if entry is not None else np.zeros(count, dtype=np.float32)
