"""The bytes-per-round benchmark runs end to end and its figures say what the transfer modes promise.

(The aggregation comparison's check, streamed fedavg equal to a load-all mean, is tests/test_one_pass.py's,
bit for bit; its full-size run is done by hand, like the other benchmarks'.)
"""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def test_round_bytes_runs_and_int8_moves_less(tmp_path, demo_assets):
    """benchmarks/round_bytes.py at its smallest: 2 rounds (a change needs one), 2 steps, one facility, no
    evaluation, on the session's demo assets. Every row is printed and an int8 change is well under the
    whole model (the byte sizes depend on the model's shape only, so they hold at this size)."""
    script = REPO / "benchmarks" / "round_bytes.py"
    tiny = ["--rounds", "2", "--steps", "2", "--facilities", "1", "--no-eval", "--modes", "full-whole,full-int8"]
    proc = subprocess.run(
        [sys.executable, str(script), *tiny, "--assets", str(demo_assets.root), "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {line.split()[0]: line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("full-")}
    assert set(rows) == {"full-whole", "full-int8"}, proc.stdout
    whole_down, int8_down = float(rows["full-whole"][1]), float(rows["full-int8"][1])  # MB, rounds after the first
    assert 0 < int8_down < 0.3 * whole_down, proc.stdout
    assert float(rows["full-int8"][0]) == float(rows["full-whole"][0]), proc.stdout  # round 1: the whole model
    assert any(
        line.startswith("target full-int8 round 2+ bytes") and line.endswith("PASS")
        for line in proc.stdout.splitlines()
    )
