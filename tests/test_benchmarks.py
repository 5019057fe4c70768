"""The aggregation comparison benchmark runs end to end and its three aggregators agree where they should.

benchmarks/aggregate_compare.py at the tiny model, 2 updates, 1 repeat: every table row and target
line is printed, `xffl-cwl aggregate` (fedavg) equals the naive weighted mean, and the xFFL reference
writes a whole model. The figures at this size mean nothing; the full-size run is done by hand.
"""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def test_aggregate_compare_runs_and_outputs_agree(tmp_path):
    script = REPO / "benchmarks" / "aggregate_compare.py"
    tiny = ["--preset", "tiny", "--updates", "2", "--repeats", "1", "--check", "--workdir", str(tmp_path)]
    proc = subprocess.run([sys.executable, str(script), *tiny], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    for kind in ("ours", "xffl", "naive"):
        assert any(line.split()[:2] == ["2", kind] for line in lines), f"no table row for {kind}:\n{proc.stdout}"
    for target in (
        "ours GB/s of update bytes",
        "xffl time / ours time",
        "ours time / naive mean time",
        "ours peak over bare torch",
        "ours peak growth",
        "ours hogged time / quiet time",
    ):
        assert any(target in line for line in lines), f"no target line {target!r}:\n{proc.stdout}"
    checks = [line for line in lines if " check " in line]
    assert len(checks) == 2 and all(line.endswith("PASS") for line in checks), proc.stdout
    assert not (tmp_path / "out").exists()  # outputs removed after each run


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
