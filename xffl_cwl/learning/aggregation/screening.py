"""Screening: which updates of a round may be merged, and why each of the others may not."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from xffl_cwl.contract.options import AggregateOptions
from xffl_cwl.learning.aggregation.updates import (
    Rejected,
    Update,
    check_adapter_fits,
    check_finite,
    check_same_layout,
    load_update,
)
from xffl_cwl.learning.safetensors_stream import Checkpoint, TensorReader

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GlobalModel:
    """What every update is checked against: the current global model and its fingerprint."""

    path: Path
    checkpoint: Checkpoint
    fingerprint: str
    adapter: Checkpoint | None  # the global adapter of a FedIT federation


def screen(
    paths: list[Path],
    glob: GlobalModel,
    options: AggregateOptions,
    round_number: int | None,
    reader: TensorReader,
    chunk_elems: int,
) -> tuple[list[Update], list[Rejected]]:
    """Load and check every update; the first valid one fixes the mode and, without `round_number`, the round."""
    valid: list[Update] = []
    rejected: list[Rejected] = []
    for path in paths:
        try:
            update = load_update(path)
            _check(update, valid[0] if valid else None, valid, glob, options, round_number)
            check_finite(update, reader, chunk_elems)
        except Rejected as exc:
            log.warning("%s", exc)
            rejected.append(exc)
            continue
        valid.append(update)
    return valid, rejected


def _check(
    update: Update,
    first: Update | None,
    valid: list[Update],
    glob: GlobalModel,
    options: AggregateOptions,
    round_number: int | None,
) -> None:
    if any(u.facility == update.facility for u in valid):
        raise update.reject("a second update from the same facility")
    if first is not None and update.mode != first.mode:
        raise update.reject(f"it is a {update.mode} update, the others are {first.mode}")
    expected_round = round_number if round_number is not None else (first.round if first else None)
    if expected_round is not None and update.round != expected_round:
        raise update.reject(f"it is for round {update.round}, this aggregation is for round {expected_round}")
    if update.record.base_fingerprint != glob.fingerprint:
        raise update.reject("it was trained from a different global model (base fingerprint differs from --global)")
    if options.weighting == "samples" and update.samples == 0:
        raise update.reject("it reports 0 training samples")
    if update.mode == "full":
        if glob.adapter is not None:
            raise update.reject("the global model carries a LoRA adapter, so updates must be LoRA adapters")
        check_same_layout(update, glob.checkpoint, "global model")
        return
    check_adapter_fits(update, glob.checkpoint)
    reference = glob.adapter or (first.checkpoint if first else None)
    if options.lora_merge == "fedit" and reference is not None:
        check_same_layout(update, reference, "global adapter" if glob.adapter else "first valid adapter")
