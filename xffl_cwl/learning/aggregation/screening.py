"""Screening: which updates of a round may be merged, and why each of the others may not.

Whatever goes wrong while one update is read or checked is that update's rejection (one line: its
facility, the file or tensor, the reason), never the round's end. Tensor values are checked later,
as the merge reads them (see plans.py), so a good round reads every update once; so is the base
each update claims (GlobalModel.stale), once the global model's fingerprint is known.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from xffl_cwl.contract.options import AggregateOptions
from xffl_cwl.contract.records import Rejection
from xffl_cwl.learning.aggregation.updates import (
    Limits,
    Rejected,
    Update,
    UpdateSource,
    check_adapter_change,
    check_adapter_fits,
    check_encoded_layout,
    check_same_layout,
    load_update,
)
from xffl_cwl.learning.safetensors_stream import Checkpoint, TensorReader

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GlobalModel:
    """What every update is checked against: the current global model and its fingerprint.

    The fingerprint (a sha256 of every weight file) is computed on another thread while the round
    is merged; each update's claimed base is checked against it before the result is kept."""

    path: Path
    checkpoint: Checkpoint
    pending_fingerprint: Future[str]
    adapter: Checkpoint | None  # the global adapter of a FedIT federation
    adapter_config: object | None = None  # its AdapterConfig

    @property
    def fingerprint(self) -> str:
        return self.pending_fingerprint.result()

    def stale(self, updates: list[Update]) -> list[Update]:
        """The updates trained from another global model than this one."""
        return [u for u in updates if u.record.base_fingerprint != self.fingerprint]


STALE_BASE = "it was trained from a different global model (base fingerprint differs from --global)"


def rejection(facility: str, path: Path, reason: str) -> Rejection:
    """Log a rejection and keep only its words: nothing of a rejected update stays in memory."""
    log.warning("update from facility %r (%s) rejected: %s", facility, path, reason)
    return Rejection(facility, path.name, reason[:500])


def screen(
    sources: list[UpdateSource],
    glob: GlobalModel,
    options: AggregateOptions,
    round_number: int | None,
    reader: TensorReader,
    chunk_elems: int,
) -> tuple[list[Update], list[Rejection]]:
    """Load and check every update; the first valid one fixes the mode and, without `round_number`, the round."""
    limits = Limits.of(glob.checkpoint)
    valid: list[Update] = []
    rejected: list[Rejection] = []
    for source in sources:
        try:
            if any(u.facility == source.name for u in valid) or any(r.facility == source.name for r in rejected):
                raise Rejected(source.name, source.path, "a second update from the same facility")
            update = load_update(source, glob.path, limits)
            _check(update, valid[0] if valid else None, glob, options, round_number)
            if update.mode == "lora":
                check_adapter_change(update, reader, chunk_elems)
        except Rejected as exc:
            rejected.append(rejection(exc.facility, exc.path, exc.reason))
            continue
        except Exception as exc:  # anything else an update provokes is still only that update's failure
            rejected.append(
                rejection(source.name, source.path, f"it could not be read ({type(exc).__name__}: {str(exc)[:200]})")
            )
            continue
        valid.append(update)
    return valid, rejected


def _check(
    update: Update, first: Update | None, glob: GlobalModel, options: AggregateOptions, round_number: int | None
) -> None:
    if first is not None and update.mode != first.mode:
        raise update.reject(f"it is a {update.mode} update, the others are {first.mode}")
    expected_round = round_number if round_number is not None else (first.round if first else None)
    if expected_round is not None and update.round != expected_round:
        raise update.reject(f"it is for round {update.round}, this aggregation is for round {expected_round}")
    if options.weighting == "samples" and update.samples == 0:
        raise update.reject("it reports 0 training samples")
    if options.weighting == "tokens" and update.tokens == 0:
        raise update.reject("it reports 0 training tokens")
    if update.mode == "full":
        if glob.adapter is not None:
            raise update.reject("the global model carries a LoRA adapter, so updates must be LoRA adapters")
        if update.encoding != "fp32":
            check_encoded_layout(update, glob.checkpoint)
            return
        if update.checkpoint.relpaths != glob.checkpoint.relpaths:
            raise update.reject(
                f"its weights are in {', '.join(update.checkpoint.relpaths)[:200]}, the global model's in {', '.join(glob.checkpoint.relpaths)[:200]}"
            )
        check_same_layout(update, glob.checkpoint, "global model")
        return
    check_adapter_fits(update, glob.checkpoint)
    if options.lora_merge != "fedit":
        return
    reference = glob.adapter or (first.checkpoint if first else None)
    if reference is not None:
        check_same_layout(update, reference, "global adapter" if glob.adapter else "first valid adapter")
    config = glob.adapter_config or (first.adapter if first else None)
    if config is not None and update.adapter is not None and not update.adapter.same_merge(config):
        raise update.reject(
            f"its rank/alpha/rsLoRA ({update.adapter.r}, {update.adapter.alpha:g}, {update.adapter.use_rslora}) "
            f"differ from the {'global adapter' if glob.adapter else 'first valid adapter'}'s; FedIT averages equal adapters only"
        )
