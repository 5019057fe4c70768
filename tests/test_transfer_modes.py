"""Each facility keeps its copy of the global model and is sent only the round's change: StreamFlow and
cwltool give the same final model, bit for bit. Here LoRA with FedIT (the base is staged once, each round
moves adapters only); full fine-tuning with int8 updates and changes is run by both runners in
test_run_failure's quorum test, and an exact-LoRA change (low-rank factors) rebuilt bit for bit by a
facility in test_lora_merge.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import write_federation
from xffl_cwl.federation import load_federation
from xffl_cwl.generator import generate

MODES = {
    "fedit": ("  mode: lora\n  lora:\n    r: 4\n", "  lora_merge: fedit\n", "fedavg"),
}


def _folder(tmp_path: Path, demo_assets, mode: str) -> Path:
    training, aggregation, strategy = MODES[mode]
    path = write_federation(tmp_path / f"{mode}.yml", demo_assets, ["leonardo"], rounds=2, steps=3, strategy=strategy)
    text = path.read_text().replace(f"test_set: {demo_assets.test_set}\n", "")
    text = text.replace("training:\n", "training:\n" + training).replace(
        "aggregation:\n", "aggregation:\n" + aggregation
    )
    path.write_text(text)
    generate(load_federation(path), tmp_path / mode)
    return tmp_path / mode


def _weights(directory: Path) -> dict:
    files = sorted(directory.rglob("*.safetensors"))
    return {f"{p.relative_to(directory)}:{k}": v for p in files for k, v in load_file(str(p)).items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, demo_assets):
    """FedIT under both runners at once (each runner only reads its run folder); one facility keeps it
    cheap: what is under test is what moves, and that both runners agree."""
    tmp_path = tmp_path_factory.mktemp("modes")
    folders = {mode: _folder(tmp_path, demo_assets, mode) for mode in MODES}
    cwltool = {
        mode: subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cwltool",
                "--enable-ext",
                "--no-container",
                "--outdir",
                str(tmp_path / f"{mode}-cwl"),
                "main.cwl",
                "inputs.yml",
            ],
            cwd=folder,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for mode, folder in folders.items()
    }
    streamflow = {
        mode: subprocess.Popen(
            [sys.executable, "-m", "xffl_cwl.cli", "run", str(folder), "--no-check"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for mode, folder in folders.items()
    }
    try:
        errors = {}
        for mode in MODES:
            _, err = streamflow[mode].communicate(timeout=600)
            if streamflow[mode].returncode != 0:
                errors[f"{mode} streamflow"] = err[-3000:]
            _, err = cwltool[mode].communicate(timeout=600)
            if cwltool[mode].returncode != 0 or "permanentFail" in err:
                errors[f"{mode} cwltool"] = err[-3000:]
    finally:
        for proc in [*cwltool.values(), *streamflow.values()]:
            proc.kill()
    assert not errors, errors
    return tmp_path, folders


@pytest.mark.parametrize("mode", sorted(MODES))
def test_both_runners_give_the_same_final_model(runs, mode):
    tmp_path, folders = runs
    ours, theirs = _weights(folders[mode] / "out" / "model"), _weights(tmp_path / f"{mode}-cwl" / "model")
    assert ours and sorted(ours) == sorted(theirs)
    assert all((ours[k] == theirs[k]).all() for k in ours), "not bit for bit"


def _aggregates(run: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(run.glob("work/aggregator/*/model/aggregate.json"))]


def test_the_second_round_stages_the_change_and_the_local_copy_not_the_model(runs):
    """StreamFlow's data locality: round 2's train step at leonardo gets the change from the aggregator and
    leonardo's own copy; the global model is staged to it in round 1 only."""
    _, folders = runs
    for mode in MODES:
        staged = [p for p in (folders[mode] / "work" / "leonardo").glob("*/*/*") if p.is_symlink()]
        names = sorted(p.name for p in staged)
        assert names.count("model") == 1, names  # round 1 only
        assert names.count("change") == 1 and names.count("model.local") == 1, names
        change = next(p for p in staged if p.name == "change").resolve()
        assert change.parent.parent.name == "aggregator"


def _aggregates(run: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(run.glob("work/aggregator/*/model/aggregate.json"))]


def test_fedit_rounds_move_adapters_only(runs):
    _, folders = runs
    records = _aggregates(folders["fedit"])
    model_bytes = sum(p.stat().st_size for p in (folders["fedit"] / "out" / "model").glob("*.safetensors"))
    assert len(records) == 2
    for record in records:
        assert record["change"]["kind"] == "adapter"
        assert record["change"]["bytes"] < 0.02 * model_bytes
