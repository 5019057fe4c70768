"""The records the tools write, typed: update.json, aggregate.json, history lines, stdout events.

`from_json` is strict (a record from another machine is untrusted): every field has its type,
integers are JSON integers within bounds, numbers are finite, strings are bounded. A violation is a
RecordError naming the field. `Event.parse` is the lenient reader of the tools' one-line stdout
summaries: what does not fit becomes None, never an exception.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from xffl_cwl.contract.options import Mode
from xffl_cwl.contract.params import shown

MAX_INT = 2**53  # beyond this a JSON integer is not exactly a float: no honest count is that large
MAX_TEXT = 4096
FINGERPRINT = re.compile(r"^sha256:[0-9a-f]{64}$")
UPDATE_ENCODINGS = ("fp32", "bf16", "int8")  # the Encoding literal of contract.options
PRINTABLE = re.compile(r"[!-~]+")  # ASCII without spaces or control characters
CONTAINER_TEXT_LIMIT = 512


def container_text(value: Any) -> bool:
    """A container record field: printable ASCII without spaces, at most CONTAINER_TEXT_LIMIT characters."""
    return isinstance(value, str) and 0 < len(value) <= CONTAINER_TEXT_LIMIT and bool(PRINTABLE.fullmatch(value))


class RecordError(ValueError):
    """A record that does not have the promised shape; the message names the field."""


def _fail(where: str, problem: str) -> RecordError:
    return RecordError(f"{where}: {problem}")


def _obj(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(where, f"must be a JSON object, got {type(value).__name__}")
    return value


def _int(value: Any, where: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(where, f"must be an integer, got {_short(value)}")
    if not minimum <= value <= MAX_INT:
        raise _fail(where, f"must be an integer in [{minimum}, 2^53], got {_short(value)}")
    return value


def _num(value: Any, where: str, minimum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _fail(where, f"must be a finite number, got {_short(value)}")
    if isinstance(value, int) and abs(value) > MAX_INT:
        raise _fail(where, f"is out of range: {_short(value)}")
    if minimum is not None and value < minimum:
        raise _fail(where, f"must be at least {minimum:g}, got {value}")
    return float(value)


def _opt(check, value: Any, where: str, *args: Any) -> Any:
    return None if value is None else check(value, where, *args)


def _str(value: Any, where: str, limit: int = MAX_TEXT) -> str:
    if not isinstance(value, str):
        raise _fail(where, f"must be a string, got {_short(value)}")
    if len(value) > limit:
        raise _fail(where, f"is longer than {limit} characters")
    return value


def _short(value: Any) -> str:
    return shown(value)


def json_text(data: dict[str, Any]) -> str:
    """Strict JSON (no NaN or Infinity, which other readers reject), indented for people."""
    return json.dumps(data, indent=2, allow_nan=False) + "\n"


def finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


@dataclass(frozen=True)
class LossSpan:
    """Training loss over a round: first step, last step, mean of the steps."""

    first: float
    last: float
    mean: float

    @classmethod
    def from_json(cls, value: Any, where: str) -> LossSpan:
        d = _obj(value, where)
        return cls(*(_num(d.get(k), f"{where}.{k}") for k in ("first", "last", "mean")))


@dataclass(frozen=True)
class HeldOut:
    """Held-out loss before and after the local steps; None when nothing was held out."""

    before: float | None
    after: float | None

    @classmethod
    def from_json(cls, value: Any, where: str) -> HeldOut:
        d = _obj(value, where)
        return cls(_opt(_num, d.get("before"), f"{where}.before"), _opt(_num, d.get("after"), f"{where}.after"))


@dataclass(frozen=True)
class ContainerRecord:
    """The image a tool ran in: runtime (podman, apptainer, ... or none), image reference and its digest
    (podman's image ID, or the sha256 of a .sif), and the build inputs' digest the image carries."""

    runtime: str = "none"
    image: str = "none"
    digest: str = "none"
    build: str = "none"

    @classmethod
    def from_json(cls, value: Any, where: str) -> ContainerRecord:
        d = _obj(value, where)
        fields_ = {}
        for name in ("runtime", "image", "digest", "build"):
            text = _str(d.get(name, "none"), f"{where}.{name}", CONTAINER_TEXT_LIMIT)
            if not container_text(text):
                raise _fail(f"{where}.{name}", "must be printable text without spaces")
            fields_[name] = text
        return cls(**fields_)


@dataclass(frozen=True)
class LoraSummary:
    r: int
    alpha: float
    targets: list[str]
    dropout: float


@dataclass(frozen=True)
class UpdateRecord:
    """update.json: what one facility did in one round, and from which global model it started."""

    FORMAT: ClassVar[str] = "xffl-update"

    facility: str
    round: int
    mode: Mode
    samples: int
    tokens: int
    steps: int
    train_loss: LossSpan
    eval_loss: HeldOut
    base_fingerprint: str
    eval_samples: int = 0
    wall_seconds: float | None = None
    train_seconds: float | None = None
    tokens_per_second: float | None = None
    bytes_written: int = 0
    lora: LoraSummary | None = None
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    device: str | None = None
    software: dict[str, str] = field(default_factory=dict)
    container: ContainerRecord = field(default_factory=ContainerRecord)
    encoding: str = "fp32"  # full mode: fp32 is the new weights; bf16/int8 their encoded change (learning/deltas.py)

    def to_json(self) -> dict[str, Any]:
        return {"format": self.FORMAT, "version": 1, **asdict(self)}

    @classmethod
    def from_json(cls, value: Any) -> UpdateRecord:
        d = _obj(value, "update.json")
        if d.get("format") != cls.FORMAT:
            raise _fail("update.json format", f"must be {cls.FORMAT!r}, got {_short(d.get('format'))}")
        mode = d.get("mode")
        if mode not in ("full", "lora"):
            raise _fail("update.json mode", f"must be 'full' or 'lora', got {_short(mode)}")
        facility = _str(d.get("facility"), "update.json facility", 64)
        if not facility:
            raise _fail("update.json facility", "must not be empty")
        fp = _str(d.get("base_fingerprint"), "update.json base_fingerprint", 80)
        if not FINGERPRINT.fullmatch(fp):
            raise _fail("update.json base_fingerprint", "is not sha256:<64 hex digits>")
        encoding = d.get("encoding", "fp32")
        if encoding not in UPDATE_ENCODINGS or (mode == "lora" and encoding != "fp32"):
            raise _fail(
                "update.json encoding",
                f"must be one of {', '.join(UPDATE_ENCODINGS)} (fp32 for lora), got {_short(encoding)}",
            )
        return cls(
            facility=facility,
            round=_int(d.get("round"), "update.json round"),
            mode=mode,
            samples=_int(d.get("samples"), "update.json samples"),
            tokens=_int(d.get("tokens", 0), "update.json tokens"),
            steps=_int(d.get("steps"), "update.json steps"),
            train_loss=LossSpan.from_json(d.get("train_loss"), "update.json train_loss"),
            eval_loss=HeldOut.from_json(d.get("eval_loss", {}), "update.json eval_loss"),
            base_fingerprint=fp,
            eval_samples=_int(d.get("eval_samples", 0), "update.json eval_samples"),
            wall_seconds=_opt(_num, d.get("wall_seconds"), "update.json wall_seconds", 0),
            train_seconds=_opt(_num, d.get("train_seconds"), "update.json train_seconds", 0),
            tokens_per_second=_opt(_num, d.get("tokens_per_second"), "update.json tokens_per_second", 0),
            bytes_written=_int(d.get("bytes_written", 0), "update.json bytes_written"),
            container=ContainerRecord.from_json(d.get("container", {}), "update.json container"),
            encoding=encoding,
        )


@dataclass(frozen=True)
class FacilitySummary:
    """A merged facility, as aggregate.json records it."""

    samples: int
    tokens: int
    weight: float
    steps: int
    train_loss: LossSpan
    eval_loss: HeldOut
    wall_seconds: float | None
    delta_norm: float | None
    basis: float  # what the weight was computed from: declared samples/tokens (capped), 1, or the set weight
    capped: bool  # the declared count was above what the workflow allows this facility
    clip: float  # the norm-clipping factor applied to its change (1: unclipped)
    container: ContainerRecord  # the image the facility says its update was trained in


@dataclass(frozen=True)
class Rejection:
    facility: str
    update: str
    reason: str


@dataclass(frozen=True)
class LeftOut:
    """A facility that sent no update this round (its training failed, ran past its deadline, or its
    facility could not be reached), and why."""

    facility: str
    reason: str


@dataclass(frozen=True)
class TrainStatus:
    """status.json of a train step: how the facility's round ended. `ok` comes with an update; any
    other status means the facility is left out of the round and the step still succeeds."""

    FORMAT: ClassVar[str] = "xffl-train-status"
    STATUSES: ClassVar[tuple[str, ...]] = ("ok", "failed", "deadline", "lost")

    facility: str
    round: int
    status: str
    reason: str = ""
    seconds: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"format": self.FORMAT, "version": 1, **asdict(self)}

    @classmethod
    def from_json(cls, value: Any) -> TrainStatus:
        """Strict: a status comes from the facility, like its update."""
        d = _obj(value, "status.json")
        if d.get("format") != cls.FORMAT:
            raise _fail("status.json format", f"must be {cls.FORMAT!r}, got {_short(d.get('format'))}")
        status = d.get("status")
        if status not in cls.STATUSES:
            raise _fail("status.json status", f"must be one of {', '.join(cls.STATUSES)}, got {_short(status)}")
        return cls(
            facility=_str(d.get("facility"), "status.json facility", 64),
            round=_int(d.get("round"), "status.json round"),
            status=status,
            reason=_str(d.get("reason", ""), "status.json reason", 2000),
            seconds=_opt(_num, d.get("seconds"), "status.json seconds", 0),
        )


@dataclass(frozen=True)
class AggregateRecord:
    """aggregate.json: how one round's global model was made."""

    FORMAT: ClassVar[str] = "xffl-aggregate"

    round: int | None
    mode: Mode
    strategy: str
    hyperparameters: dict[str, Any]
    lora_merge: str | None
    weighting: str
    facilities: dict[str, FacilitySummary]
    rejected: list[Rejection]
    left_out: list[LeftOut]
    samples: int
    tokens: int
    update_norm: float
    base_fingerprint: str
    fingerprint: str
    state_step: int | None
    bytes_read: int
    bytes_written: int
    seconds: float
    peak_rss_bytes: int
    container: ContainerRecord  # the image this aggregation ran in
    change: ChangeSummary | None = None  # what the facilities were sent to rebuild this model

    def to_json(self) -> dict[str, Any]:
        return {"format": self.FORMAT, "version": 1, **asdict(self)}


@dataclass(frozen=True)
class ChangeSummary:
    """The round's change as sent to the facilities: its kind (delta, adapter), encoding and size."""

    kind: str
    encoding: str
    bytes: int


@dataclass(frozen=True)
class FacilityRound:
    """One facility in a history line."""

    samples: int | None
    train_loss: float | None
    eval_loss_after: float | None
    wall_seconds: float | None


@dataclass(frozen=True)
class RoundRecord:
    """One line of history.jsonl: a round's global held-out loss and what the aggregator did."""

    round: int
    eval_loss: float | None
    eval_tokens: int | None = None
    strategy: str | None = None
    facilities: dict[str, FacilityRound] = field(default_factory=dict)
    rejected: list[Rejection] = field(default_factory=list)
    update_norm: float | None = None
    fingerprint: str | None = None
    left_out: list[LeftOut] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        if self.strategy is None:  # the baseline: nothing was aggregated
            for key in ("strategy", "facilities", "rejected", "update_norm", "fingerprint", "left_out"):
                data.pop(key)
        if self.eval_tokens is None:
            data.pop("eval_tokens")
        return data

    @classmethod
    def from_json(cls, value: Any, where: str = "history") -> RoundRecord:
        """Lenient: a history is ours, but may have been edited; unknown shapes read as None."""
        d = value if isinstance(value, dict) else {}
        facilities = {}
        for name, info in (d.get("facilities") or {}).items() if isinstance(d.get("facilities"), dict) else []:
            info = info if isinstance(info, dict) else {}
            facilities[str(name)] = FacilityRound(
                _lenient(_int, info.get("samples")),
                _lenient(_num, info.get("train_loss")),
                _lenient(_num, info.get("eval_loss_after")),
                _lenient(_num, info.get("wall_seconds")),
            )
        rejected = []
        for r in d.get("rejected") or [] if isinstance(d.get("rejected"), list) else []:
            if isinstance(r, dict):
                rejected.append(
                    Rejection(str(r.get("facility", "?")), str(r.get("update", "?")), str(r.get("reason", "?")))
                )
        left_out = [
            LeftOut(str(r.get("facility", "?"))[:64], str(r.get("reason", "?"))[:500])
            for r in (d.get("left_out") if isinstance(d.get("left_out"), list) else [])
            if isinstance(r, dict)
        ]
        round_number = _lenient(_int, d.get("round"))
        if round_number is None:
            raise _fail(where, "has no round number")
        return cls(
            round=round_number,
            eval_loss=_lenient(_num, d.get("eval_loss")),
            eval_tokens=_lenient(_int, d.get("eval_tokens")),
            strategy=d.get("strategy") if isinstance(d.get("strategy"), str) else None,
            facilities=facilities,
            rejected=rejected,
            update_norm=_lenient(_num, d.get("update_norm")),
            fingerprint=d.get("fingerprint") if isinstance(d.get("fingerprint"), str) else None,
            left_out=left_out,
        )


def _lenient(check, value: Any) -> Any:
    try:
        return None if value is None else check(value, "")
    except RecordError:
        return None


@dataclass(frozen=True)
class Event:
    """A tool's one-line summary on stdout; `event` says which tool wrote it."""

    event: str  # trained | left_out | aggregated | evaluated
    round: int | None = None
    facility: str | None = None
    steps: int | None = None
    samples: int | None = None
    train_loss: LossSpan | None = None
    eval_loss: float | None = None  # evaluated: the global held-out loss
    held_out: HeldOut | None = None  # trained: the facility's own held-out loss before/after
    strategy: str | None = None
    update_norm: float | None = None
    rejected: list[Rejection] = field(default_factory=list)
    left_out: list[LeftOut] = field(default_factory=list)
    reason: str | None = None  # left_out: why this facility sent no update

    KINDS: ClassVar[tuple[str, ...]] = ("trained", "left_out", "aggregated", "evaluated")

    def line(self) -> str:
        data = {k: v for k, v in asdict(self).items() if v is not None and v != []}
        return json.dumps(data, allow_nan=False)

    @classmethod
    def parse(cls, text: str) -> Event | None:
        """The event of a line, or None when the line is not one; malformed fields read as None."""
        try:
            d = json.loads(text)
        except ValueError:
            return None
        if not isinstance(d, dict) or d.get("event") not in cls.KINDS:
            return None
        loss = d.get("train_loss")
        span = None
        if isinstance(loss, dict):
            span = LossSpan(*(_lenient(_num, loss.get(k)) for k in ("first", "last", "mean")))
        held = d.get("held_out")
        rejected = [
            Rejection(
                str(r.get("facility", "?"))[:64], str(r.get("update", "?"))[:200], str(r.get("reason", "?"))[:300]
            )
            for r in (d.get("rejected") if isinstance(d.get("rejected"), list) else [])
            if isinstance(r, dict)
        ]
        left_out = [
            LeftOut(str(r.get("facility", "?"))[:64], str(r.get("reason", "?"))[:300])
            for r in (d.get("left_out") if isinstance(d.get("left_out"), list) else [])
            if isinstance(r, dict)
        ]
        return cls(
            event=d["event"],
            round=_lenient(_int, d.get("round")),
            facility=d["facility"][:64] if isinstance(d.get("facility"), str) else None,
            steps=_lenient(_int, d.get("steps")),
            samples=_lenient(_int, d.get("samples")),
            train_loss=span,
            eval_loss=_lenient(_num, d.get("eval_loss")),
            held_out=HeldOut(_lenient(_num, held.get("before")), _lenient(_num, held.get("after")))
            if isinstance(held, dict)
            else None,
            strategy=d["strategy"][:64] if isinstance(d.get("strategy"), str) else None,
            update_norm=_lenient(_num, d.get("update_norm")),
            rejected=rejected,
            left_out=left_out,
            reason=d["reason"][:300] if isinstance(d.get("reason"), str) else None,
        )
