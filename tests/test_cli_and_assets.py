"""The CLI stays light to start, and demo assets are deterministic, local and non-IID."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import run_cli
from xffl_cwl.learning.data import load_texts
from xffl_cwl.learning.model_dir import fingerprint


def test_help_imports_no_heavy_library():
    code = "import sys; from xffl_cwl.cli import cli; heavy = [m for m in ('torch', 'transformers', 'peft', 'datasets', 'streamflow', 'cwltool') if m in sys.modules]; print(heavy)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
    proc = run_cli("--help")
    assert proc.returncode == 0
    for command in ("train", "aggregate", "evaluate", "demo-assets"):
        assert command in proc.stdout


def test_demo_assets_are_deterministic_and_non_iid(tmp_path):
    from xffl_cwl.learning.demo_assets import make_demo_assets

    a = make_demo_assets(
        tmp_path / "a", ["leonardo", "lumi", "vega"], samples_per_facility=50, test_samples_per_task=5, seed=3
    )
    b = make_demo_assets(
        tmp_path / "b", ["leonardo", "lumi", "vega"], samples_per_facility=50, test_samples_per_task=5, seed=3
    )
    assert fingerprint(a.model) == fingerprint(b.model)
    assert len(set(a.tasks.values())) == 3
    for name in a.datasets:
        assert load_texts(a.datasets[name]) == load_texts(b.datasets[name])
    # each facility holds one kind of text, the test set all of them
    first_words = {name: {t.split()[0] for t in load_texts(path)} for name, path in a.datasets.items()}
    assert first_words["lumi"] == {"reverse"} and first_words["vega"] == {"the"}
    tasks = [json.loads(line)["task"] for line in a.test_set.read_text().splitlines()]
    assert sorted(set(tasks)) == sorted(a.tasks.values()) and len(tasks) == 15
    c = make_demo_assets(tmp_path / "c", ["leonardo"], samples_per_facility=50, seed=4)
    assert fingerprint(c.model) != fingerprint(a.model)


def test_demo_assets_cli_refuses_existing_output(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    proc = run_cli("demo-assets", "--out", tmp_path / "x")
    assert proc.returncode == 2 and "already exists and is not empty" in proc.stderr
    assert (tmp_path / "x" / "keep.txt").read_text() == "mine"
    proc = run_cli("demo-assets", "--out", tmp_path / "y", "--facilities", "99")
    assert proc.returncode == 2 and "--facilities must be between 1 and 8" in proc.stderr
    assert not (tmp_path / "y").exists()


def test_evaluate_appends_one_line_per_round(demo_assets, tmp_path):
    first = run_cli(
        "evaluate",
        "--model",
        demo_assets.model,
        "--dataset",
        demo_assets.test_set,
        "--seq-len",
        "64",
        "--out",
        tmp_path / "h0.jsonl",
        check=True,
    )
    assert json.loads(first.stdout)["round"] == 0
    run_cli(
        "evaluate",
        "--model",
        demo_assets.model,
        "--history",
        tmp_path / "h0.jsonl",
        "--round",
        "1",
        "--out",
        tmp_path / "h1.jsonl",
        check=True,
    )
    lines = [json.loads(line) for line in (tmp_path / "h1.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == [0, 1]
    assert lines[0]["eval_loss"] > 4 and lines[1]["eval_loss"] is None
