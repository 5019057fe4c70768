"""The federation's history: one JSON line per round, carried from round to round.

Each line joins what the aggregator recorded (facilities, their losses, rejections) with the
global model's held-out loss, so a whole run can be read back from one small file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from xffl_cwl.atomic import write_text_atomic
from xffl_cwl.errors import InputError
from xffl_cwl.model_dir import AGGREGATE_JSON, read_json


def read_history(path: Path | None) -> list[dict[str, Any]]:
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


def round_record(model_dir: Path, evaluation: dict[str, Any] | None, round_number: int | None) -> dict[str, Any]:
    """One line: the round, the held-out loss of its global model, and the aggregator's summary."""
    summary = read_json(Path(model_dir) / AGGREGATE_JSON, "an aggregated model") if (Path(model_dir) / AGGREGATE_JSON).is_file() else None
    if round_number is None:
        round_number = summary.get("round") if summary else 0
    record: dict[str, Any] = {"round": round_number, "eval_loss": evaluation["loss"] if evaluation else None}
    if evaluation:
        record["eval_tokens"] = evaluation["tokens"]
    if summary:
        record["strategy"] = summary.get("strategy")
        record["facilities"] = {
            name: {
                "samples": info.get("samples"),
                "train_loss": (info.get("train_loss") or {}).get("last"),
                "eval_loss_after": (info.get("eval_loss") or {}).get("after"),
                "wall_seconds": info.get("wall_seconds"),
            }
            for name, info in summary.get("facilities", {}).items()
        }
        record["rejected"] = summary.get("rejected", [])
        record["update_norm"] = summary.get("update_norm")
        record["fingerprint"] = summary.get("fingerprint")
    return record


def append_history(previous: Path | None, out: Path, record: dict[str, Any]) -> list[dict[str, Any]]:
    """Write previous lines plus `record` to `out` (a new file: CWL steps never edit their inputs)."""
    records = read_history(previous) + [record]
    write_text_atomic(out, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    return records
