"""The federation's history: one JSON line per round, carried from round to round.

Each line joins what the aggregator recorded (facilities, their losses, rejections) with the
global model's held-out loss, so a whole run can be read back from one small file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from xffl_cwl.atomic import write_text_atomic
from xffl_cwl.contract.layout import AGGREGATE_JSON
from xffl_cwl.contract.records import RoundRecord, finite_or_none
from xffl_cwl.errors import InputError
from xffl_cwl.learning.model_dir import read_json


def read_history(path: Path | None) -> list[dict[str, Any]]:
    """The lines of a history file, as they were written."""
    if path is None:
        return []
    records = []
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"--history {path}:{lineno} is not valid JSON ({exc.msg})") from exc
        records.append(record)
    return records


def round_record(model_dir: Path, evaluation: dict[str, Any] | None, round_number: int | None) -> RoundRecord:
    """One line: the round, the held-out loss of its global model, and the aggregator's summary."""
    summary_path = Path(model_dir) / AGGREGATE_JSON
    summary = read_json(summary_path, "an aggregated model") if summary_path.is_file() else None
    if round_number is None:
        round_number = summary.get("round") if summary else 0
    record = {
        "round": round_number,
        "eval_loss": finite_or_none(evaluation["loss"]) if evaluation else None,
        "eval_tokens": evaluation["tokens"] if evaluation else None,
    }
    if summary:
        record |= {
            "strategy": summary.get("strategy"),
            "facilities": {
                name: {
                    "samples": info.get("samples"),
                    "train_loss": (info.get("train_loss") or {}).get("last"),
                    "eval_loss_after": (info.get("eval_loss") or {}).get("after"),
                    "wall_seconds": info.get("wall_seconds"),
                }
                for name, info in (summary.get("facilities") or {}).items()
                if isinstance(info, dict)
            },
            "rejected": summary.get("rejected", []),
            "left_out": summary.get("left_out", []),
            "update_norm": summary.get("update_norm"),
            "fingerprint": summary.get("fingerprint"),
        }
    return RoundRecord.from_json(record, str(summary_path))


def append_history(previous: Path | None, out: Path, record: RoundRecord) -> None:
    """Write previous lines plus `record` to `out` (a new file: CWL steps never edit their inputs)."""
    lines = [json.dumps(r, sort_keys=True) for r in read_history(previous)]
    lines.append(json.dumps(record.to_json(), sort_keys=True, allow_nan=False))
    write_text_atomic(out, "".join(line + "\n" for line in lines))
