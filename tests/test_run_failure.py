"""A failing facility stops the run within a bounded time and is named; StreamFlow alone would hang."""

from __future__ import annotations

import time

from conftest import run_cli, write_federation
from xffl_cwl.federation import load_federation
from xffl_cwl.generator import generate


def test_failed_facility_is_named_and_the_run_never_hangs(tmp_path, demo_assets):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{not json\n')
    path = write_federation(tmp_path / "federation.yml", demo_assets, ["leonardo", "lumi"], rounds=2, steps=5)
    path.write_text(path.read_text().replace(f"dataset: {demo_assets.datasets['lumi']}", f"dataset: {broken}"))
    generate(load_federation(path), tmp_path / "run")
    started = time.monotonic()
    proc = run_cli("run", tmp_path / "run", timeout=300)
    elapsed = time.monotonic() - started
    assert proc.returncode == 1
    assert elapsed < 60, elapsed
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("xffl-cwl run: error: facility lumi failed in round 1/2")
    assert "broken.jsonl:2 is not valid JSON" in last
    assert "/work/lumi/" in last and last.endswith("train.log")
    assert not (tmp_path / "run" / "out" / "model").exists()


def test_failed_aggregation_is_named(tmp_path, demo_assets):
    # min_updates above the number of facilities cannot be generated, so break it by hand in round.cwl
    path = write_federation(tmp_path / "federation.yml", demo_assets, ["leonardo"], rounds=1, steps=2)
    generate(load_federation(path), tmp_path / "run")
    round_cwl = tmp_path / "run" / "round.cwl"
    round_cwl.write_text(round_cwl.read_text().replace("min_updates: {default: 1}", "min_updates: {default: 5}"))
    started = time.monotonic()
    proc = run_cli("run", tmp_path / "run", timeout=300)
    assert proc.returncode == 1 and time.monotonic() - started < 60
    last = proc.stderr.strip().splitlines()[-1]
    assert "step aggregate (on aggregator) failed in round 1/1" in last
    assert "--min-updates is 5" in last and last.endswith("aggregate.log")


def test_run_refuses_a_folder_that_is_not_a_run(tmp_path):
    proc = run_cli("run", tmp_path / "nothing")
    assert proc.returncode == 2 and "does not exist" in proc.stderr
