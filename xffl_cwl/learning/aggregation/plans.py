"""Merge plans: for every output tensor, where its value comes from.

A tensor is either copied from the global model or stepped towards a target: the clients'
weighted mean (full updates, FedIT adapters) or the global weight plus the exact weighted mean of
the clients' LoRA changes. Targets are computed chunk by chunk, so memory stays bounded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from xffl_cwl.learning.aggregation.screening import GlobalModel
from xffl_cwl.learning.aggregation.updates import Update
from xffl_cwl.learning.model_dir import ADAPTER_STEM, ADAPTER_SUBDIR
from xffl_cwl.learning.safetensors_stream import Checkpoint, TensorEntry, TensorReader, TensorSpec

# (start, count, current global values or None) -> the clients' weighted mean for those elements, fp32.
Target = Callable[[int, int, "torch.Tensor | None"], torch.Tensor]
Members = list[tuple[float, Update]]  # (normalised weight, update)


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


@dataclass
class Norms:
    """Squared L2 norms accumulated chunk by chunk."""

    per_facility: dict[str, float] = field(default_factory=dict)
    update: float = 0.0

    def add(self, facility: str, value: float) -> None:
        self.per_facility[facility] = self.per_facility.get(facility, 0.0) + value


def full_target(name: str, members: Members, reader: TensorReader, norms: Norms) -> Target:
    def target(start: int, count: int, current: torch.Tensor | None) -> torch.Tensor:
        acc = torch.zeros(count, dtype=torch.float32)
        for weight, update in members:
            values = reader.read(update.checkpoint.by_name[name], start, count).float()
            if current is not None:
                norms.add(update.facility, float(torch.sum((values - current) ** 2)))
            acc.add_(values, alpha=weight)
        return acc

    return target


def exact_lora_target(base: TensorEntry, members: Members, reader: TensorReader, norms: Norms) -> Target:
    """current + sum_i w_i * scale_i * B_i[rows] @ A_i: the exact mean of the clients' merged weights."""
    cols = base.shape[1]

    def target(start: int, count: int, current: torch.Tensor | None) -> torch.Tensor:
        assert current is not None
        first_row, rows = start // cols, count // cols
        acc = current.clone()
        for weight, update in members:
            module = update.modules.get(base.name)
            if module is None:
                continue
            a = reader.read(module.a).float().view(module.rank, cols)
            b = reader.read(module.b, first_row * module.rank, rows * module.rank).float().view(rows, module.rank)
            delta = (b @ a).mul_(module.scale).reshape(-1)
            norms.add(update.facility, float(torch.sum(delta**2)))
            acc.add_(delta, alpha=weight)
        return acc

    return target


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


def full_plan(glob: GlobalModel, members: Members, reader: TensorReader, norms: Norms) -> list[OutputShard]:
    return _model_plan(
        glob.checkpoint, {e.name: full_target(e.name, members, reader, norms) for e in glob.checkpoint.entries()}
    )


def exact_lora_plan(glob: GlobalModel, members: Members, reader: TensorReader, norms: Norms) -> list[OutputShard]:
    adapted = {name for _, u in members for name in u.modules}
    targets = {name: exact_lora_target(glob.checkpoint.by_name[name], members, reader, norms) for name in adapted}
    return _model_plan(glob.checkpoint, targets)


def fedit_plan(glob: GlobalModel, members: Members, reader: TensorReader, norms: Norms) -> list[OutputShard]:
    """FedIT: the base is copied, the adapter's A and B are averaged separately."""
    reference = glob.adapter or members[0][1].checkpoint
    adapter_plans = [
        TensorPlan(
            TensorSpec(e.name, e.dtype, e.shape),
            glob.adapter.by_name[e.name] if glob.adapter else None,
            full_target(e.name, members, reader, norms),
        )
        for e in reference.entries()
    ]
    shard_meta = reference.shards[0].metadata if len(reference.shards) == 1 else {"format": "pt"}
    adapter = OutputShard(f"{ADAPTER_SUBDIR}/{ADAPTER_STEM}.safetensors", shard_meta, adapter_plans)
    return [*_model_plan(glob.checkpoint, {}), adapter]
