"""benchmarks/fl_quality.py at a small size (2 facilities, 2 rounds of 10 steps): its table is complete
and consistent, and federating beats training alone on the same compute (the real train, aggregate and
evaluate functions, in one process)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

from conftest import REPO


def test_fl_quality_table_at_a_small_size(tmp_path):
    proc = subprocess.run(
        [
            sys.executable, str(REPO / "benchmarks" / "fl_quality.py"), "--rounds", "2", "--steps", "10",
            "--facilities", "2", "--strategies", "fedavg,fedavgm/lr=2/m=0.5", "--out", str(tmp_path),
        ],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "fl_quality.json").read_text())
    assert result["total_steps"] == 2 * 10 * 2 and result["facilities"] == ["leonardo", "lumi"]
    losses = [result["initial"], result["centralized"], *result["alone"].values()]
    losses += [x for curve in result["federated"].values() for x in curve]
    assert all(math.isfinite(x) and x > 0 for x in losses)
    for curve in result["federated"].values():
        assert len(curve) == 3 and curve[0] == result["initial"] and curve[-1] < curve[0] - 1.0
    best = min(curve[-1] for curve in result["federated"].values())
    print("fl_quality small:", json.dumps({k: result[k] for k in ("initial", "alone", "centralized")}), best)
    assert all(best < alone for alone in result["alone"].values()), result  # federating pays, even this small
    # the table names every kind of training with its loss, the verdict matches the numbers
    table = (tmp_path / "fl_quality.md").read_text()
    for row in [
        "initial model",
        "federated, fedavg",
        "federated, fedavgm/lr=2/m=0.5",
        "leonardo alone",
        "lumi alone",
        "centralized",
    ]:
        assert f"| {row} |" in table, row
    assert f"| centralized | {result['centralized']:.4f} | +0.0% |" in table
    assert f"| centralized, 20 steps (one facility's time) | {result['centralized_serial']:.4f} |" in table
    alone, central = result["verdict"]
    assert "below every facility alone" in alone["target"] and alone["pass"] is True
    within = best / result["centralized"] - 1 <= 0.10
    assert "of centralized" in central["target"] and central["pass"] == within
    assert ("PASS" if within else "MISS") + ": federated" in proc.stdout
    from PIL import Image

    with Image.open(tmp_path / "fl_quality.png") as image:
        assert image.width > 300 and len(image.convert("RGB").getcolors(1 << 24)) > 3
