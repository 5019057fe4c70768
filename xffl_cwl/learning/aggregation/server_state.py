"""The server optimizer's state between rounds: `state.json` plus one safetensors file per slot.

One file per slot (e.g. `m.safetensors`, `v.safetensors`) lets the aggregator write every slot
sequentially while it streams the model once. Tensors keep the model's names and are fp32.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xffl_cwl.contract.strategies import StrategyInfo
from xffl_cwl.errors import InputError
from xffl_cwl.learning.model_dir import read_json
from xffl_cwl.learning.safetensors_stream import Checkpoint, read_checkpoint

STATE_JSON = "state.json"
STATE_FORMAT = "xffl-server-state"


@dataclass
class ServerState:
    """What the previous round left: the step count and one checkpoint per slot."""

    strategy: str
    step: int = 0
    slots: dict[str, Checkpoint] = field(default_factory=dict)

    def names(self) -> list[str]:
        """Every tensor the state covers, in storage order of its first slot."""
        first = next(iter(self.slots.values()), None)
        return [e.name for e in first.entries()] if first else []


def load_state(directory: Path | None, info: StrategyInfo) -> ServerState:
    """Read `--state`, or start from zeros when there is none."""
    strategy, slots = info.name, info.slots
    if directory is None:
        return ServerState(strategy)
    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(f"--state {directory} is not a directory; pass the state/ directory of the previous round")
    record = read_json(directory / STATE_JSON, "a server-optimizer state directory")
    if record.get("format") != STATE_FORMAT:
        raise InputError(f"--state {directory}: {STATE_JSON} is not an xffl-cwl server state")
    if record.get("strategy") != strategy:
        raise InputError(
            f"--state {directory} was written by strategy {record.get('strategy')!r}, not {strategy!r}; "
            "use the same --strategy or start without --state"
        )
    step = record.get("step")
    if not isinstance(step, int) or step < 0:
        raise InputError(f"--state {directory}: {STATE_JSON} has no valid step count")
    loaded = {slot: read_checkpoint(directory, slot) for slot in slots}
    first = next(iter(loaded.values()), None)
    for slot, ckpt in loaded.items():
        if first is not None and [(e.name, e.shape) for e in ckpt.entries()] != [
            (e.name, e.shape) for e in first.entries()
        ]:
            raise InputError(f"--state {directory}: slot {slot!r} does not cover the same tensors as the others")
        for entry in ckpt.entries():
            if entry.dtype != "F32":
                raise InputError(
                    f"--state {directory}: tensor {entry.name!r} of slot {slot!r} is {entry.dtype}, expected F32"
                )
    return ServerState(strategy, step, loaded)


def state_record(
    strategy: str, step: int, hyperparameters: dict[str, Any], slots: tuple[str, ...], names: list[str]
) -> dict[str, Any]:
    return {
        "format": STATE_FORMAT,
        "version": 1,
        "strategy": strategy,
        "step": step,
        "slots": list(slots),
        "tensors": len(names),
        "hyperparameters": hyperparameters,
    }
