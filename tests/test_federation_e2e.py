"""Two rounds, two facilities, the real tools as subprocesses: federating beats training alone."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import run_cli
from xffl_cwl.contract.options import EvaluateOptions
from xffl_cwl.learning.evaluation import evaluate_model_dir

ROUNDS, STEPS = 2, 20
TRAIN = ["--seq-len", "64", "--batch-size", "8", "--lr", "3e-3", "--no-progress"]
FACILITIES = ("leonardo", "lumi")


def _train_all(jobs: list[list[str]]) -> None:
    """Facilities train at the same time, as they would on their own clusters."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "xffl_cwl.cli", *job], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for job in jobs
    ]
    for job, proc in zip(jobs, procs, strict=False):
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{job}: {err[-2000:]}"


def test_two_rounds_two_facilities(demo_assets, tmp_path):
    test_set = demo_assets.test_set
    model = demo_assets.model
    state = None
    for rnd in range(1, ROUNDS + 1):
        _train_all(
            [
                [
                    "train",
                    "--model",
                    str(model),
                    "--dataset",
                    str(demo_assets.datasets[f]),
                    "--out",
                    str(tmp_path / f"r{rnd}-{f}"),
                    "--facility",
                    f,
                    "--round",
                    str(rnd),
                    "--local-steps",
                    str(STEPS),
                    *TRAIN,
                ]
                for f in FACILITIES
            ]
        )
        out = tmp_path / f"global-{rnd}"
        args = [
            "aggregate",
            "--global",
            model,
            "--out",
            out,
            "--round",
            rnd,
            "--strategy",
            "fedavgm",
            "--server-lr",
            "1.0",
            "--momentum",
            "0.3",
            "--min-updates",
            2,
        ]
        args += [a for f in FACILITIES for a in ("--update", f"{f}={tmp_path / f'r{rnd}-{f}'}")]
        if state is not None:
            args += ["--state", state]
        run_cli(*args, check=True)
        record = json.loads((out / "aggregate.json").read_text())
        assert record["round"] == rnd and set(record["facilities"]) == set(FACILITIES) and record["rejected"] == []
        model, state = out, out / "state"
    # each facility alone, for the same number of optimizer steps
    _train_all(
        [
            [
                "train",
                "--model",
                str(demo_assets.model),
                "--dataset",
                str(demo_assets.datasets[f]),
                "--out",
                str(tmp_path / f"local-{f}"),
                "--facility",
                f,
                "--local-steps",
                str(ROUNDS * STEPS),
                *TRAIN,
            ]
            for f in FACILITIES
        ]
    )
    loss = {
        name: evaluate_model_dir(path, test_set, EvaluateOptions(seq_len=64, batch_size=16), "cpu")["loss"]
        for name, path in [("initial", demo_assets.model), ("federated", model)]
        + [(f, tmp_path / f"local-{f}") for f in FACILITIES]
    }
    print("held-out loss on all tasks:", json.dumps(loss))
    assert loss["federated"] < loss["initial"] - 1.0
    for f in FACILITIES:
        assert loss["federated"] < loss[f], loss
