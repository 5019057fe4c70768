"""Aggregation memory does not grow with the number of updates and stays under half a model.

Runs the benchmark in benchmarks/aggregate_memory.py (real CLI, real 400 MB model, 2 and 8
updates, and two hostile ones in each run: one found only while merging, so the round is written
twice) and checks its figures; the benchmark prints them for the record.
"""

from __future__ import annotations

import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

from aggregate_memory import run


def test_peak_rss_is_bounded_and_flat_in_updates(tmp_path):
    figures = run(tmp_path, [2, 5], "bench-400mb")  # benchmarks/aggregate_compare.py measures 8
    model, baseline = figures["model_bytes"], figures["baseline_rss"]
    assert 380e6 < model < 450e6
    two, eight = figures["runs"][2], figures["runs"][5]
    # every update was really read: the 3 more of the second run were each read at least once
    assert eight["bytes_read"] - two["bytes_read"] >= 3 * model
    assert eight["peak_rss"] - baseline < model / 2
    assert two["peak_rss"] - baseline < model / 2
    assert eight["peak_rss"] <= 1.10 * two["peak_rss"]
    # the aggregator streams with numpy: its whole process stays below a bare `import torch, transformers`
    assert eight["peak_rss"] < baseline
