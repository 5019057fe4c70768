"""The federation end to end: `xffl-cwl demo` through real StreamFlow (cwltool runs the same folders in test_run_failure)."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo") / "xffl-demo"
    proc = run_cli("demo", "--workdir", workdir, "--facilities", "2", "--rounds", "2", "--steps", "5", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir, proc


def test_demo_runs_every_round_through_streamflow(demo):
    workdir, proc = demo
    history = [json.loads(line) for line in (workdir / "run" / "out" / "history.jsonl").read_text().splitlines()]
    assert [h["round"] for h in history] == [0, 1, 2]
    assert history[-1]["eval_loss"] < history[0]["eval_loss"] - 0.5
    for record in history[1:]:
        assert set(record["facilities"]) == {"leonardo", "lumi"} and record["rejected"] == []
    # progress on stderr, the table on stdout
    assert "round 2/2: aggregated with fedavg" in proc.stderr
    assert "global held-out loss" in proc.stdout
    assert f"{history[-1]['eval_loss']:.4f}" in proc.stdout


def test_each_facility_trained_in_its_own_workdir(demo):
    workdir, _ = demo
    work = workdir / "run" / "work"
    for facility in ("leonardo", "lumi"):
        updates = sorted(work.joinpath(facility).glob(f"*/{facility}/update.json"))
        assert len(updates) == 2, facility
        assert {json.loads(u.read_text())["facility"] for u in updates} == {facility}
        assert {json.loads(u.read_text())["round"] for u in updates} == {1, 2}
    assert sorted(p.name for p in work.joinpath("aggregator").glob("*/model/aggregate.json")) == ["aggregate.json"] * 2
    # nothing escaped the run folder's own scratch space
    assert (workdir / "run" / "streamflow.log").is_file() and (workdir / "run" / ".streamflow" / "sqlite.db").is_file()


def test_final_model_loads(demo):
    from transformers import AutoModelForCausalLM

    workdir, _ = demo
    model = AutoModelForCausalLM.from_pretrained(workdir / "run" / "out" / "model", local_files_only=True)
    assert model.config.model_type == "llama"
