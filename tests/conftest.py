"""Shared fixtures: demo assets built once per session, and helpers that write real update directories."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from xffl_cwl import offline

offline.configure()

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args: str | os.PathLike, check: bool = False, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `xffl-cwl ARGS` in a subprocess, as users and CWL tools do."""
    proc = subprocess.run(
        [sys.executable, "-m", "xffl_cwl.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"xffl-cwl {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def demo_assets(tmp_path_factory):
    from xffl_cwl.demo_assets import facility_names, make_demo_assets

    return make_demo_assets(tmp_path_factory.mktemp("assets") / "demo", facility_names(3), samples_per_facility=1500, test_samples_per_task=60)


def write_global(directory: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """A minimal global model directory: weights plus a config file that must be carried along."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps({"model_type": "synthetic"}))
    return directory


def write_update(
    directory: Path,
    facility: str,
    tensors: dict[str, torch.Tensor],
    base_fingerprint: str,
    samples: int = 10,
    round_number: int = 1,
    mode: str = "full",
    adapter_config: dict | None = None,
) -> Path:
    """An update directory exactly as `xffl-cwl train` lays it out, from given tensors."""
    directory.mkdir(parents=True, exist_ok=True)
    weights = "model.safetensors" if mode == "full" else "adapter_model.safetensors"
    save_file(tensors, str(directory / weights), metadata={"format": "pt"})
    if adapter_config is not None:
        (directory / "adapter_config.json").write_text(json.dumps(adapter_config))
    record = {
        "format": "xffl-update",
        "version": 1,
        "facility": facility,
        "round": round_number,
        "mode": mode,
        "samples": samples,
        "tokens": samples * 8,
        "steps": 1,
        "train_loss": {"first": 1.0, "last": 0.5, "mean": 0.7},
        "eval_loss": {"before": 1.0, "after": 0.6},
        "base_fingerprint": base_fingerprint,
    }
    (directory / "update.json").write_text(json.dumps(record))
    return directory


def write_federation(path: Path, assets, facilities: list[str], rounds: int = 2, steps: int = 10, extra: str = "", facility_extra: dict[str, str] | None = None) -> Path:
    """A federation.yml over demo assets with local facilities."""
    facility_extra = facility_extra or {}
    entries = "".join(f"  - name: {f}\n    dataset: {assets.datasets[f]}\n{facility_extra.get(f, '')}" for f in facilities)
    path.write_text(
        f"name: test\nrounds: {rounds}\nmodel: {assets.model}\ntest_set: {assets.test_set}\n"
        f"training:\n  local_steps: {steps}\n  seq_len: 64\n  lr: 0.003\n"
        f"aggregation:\n  strategy: fedavg\n  min_updates: {len(facilities)}\n{extra}facilities:\n{entries}"
    )
    return path
