"""Robust merges for a federation that does not trust every member: coordinate-wise median and trimmed
mean, and norm clipping, against numpy, with an absurd member in the round; and the supervisor's
reading of hostile tool output."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import run_aggregate, write_federation, write_global, write_update
from xffl_cwl.execution.streamflow_log import LogParser
from xffl_cwl.learning.model_dir import fingerprint

SHAPES = {"w": (7, 5), "b": (5,)}


def _round(tmp_path, scales: list[float], chunk_elems: int = 6, **settings):
    g = torch.Generator().manual_seed(0)
    base = {k: torch.randn(*s, generator=g) for k, s in SHAPES.items()}
    gdir = write_global(tmp_path / "g", base)
    ups, paths = [], []
    for i, scale in enumerate(scales):
        tensors = {k: v + scale * torch.randn(*v.shape, generator=g) for k, v in base.items()}
        ups.append(tensors)
        paths.append(write_update(tmp_path / f"f{i}", f"f{i}", tensors, fingerprint(gdir), samples=10 + i))
    record = run_aggregate(gdir, paths, tmp_path / "out", chunk_elems=chunk_elems, **settings)
    return base, ups, load_file(str(tmp_path / "out" / "model.safetensors")), record


def test_median_matches_numpy_and_ignores_an_absurd_member(tmp_path):
    base, ups, merged, _ = _round(tmp_path, [0.1, 0.1, 0.1, 0.1, 1e6], merge="median")
    for k in SHAPES:
        expected = np.median(np.stack([u[k].numpy() for u in ups]), axis=0)
        np.testing.assert_allclose(merged[k].numpy(), expected, rtol=0, atol=1e-6)
        assert merged[k].abs().max() < base[k].abs().max() + 1.0  # the 1e6 member did not drag it


def test_even_median_is_the_mean_of_the_middle_two(tmp_path):
    _, ups, merged, _ = _round(tmp_path, [0.1, 0.2, 0.3, 0.4], merge="median")
    for k in SHAPES:
        ordered = np.sort(np.stack([u[k].numpy() for u in ups]), axis=0)
        np.testing.assert_allclose(merged[k].numpy(), (ordered[1] + ordered[2]) / 2, rtol=0, atol=1e-6)


def test_trimmed_mean_drops_each_end(tmp_path):
    _, ups, merged, _ = _round(tmp_path, [0.1, 0.1, 0.1, 0.1, 0.1, 1e6], merge="trimmed_mean", trim=0.2)
    for k in SHAPES:
        ordered = np.sort(np.stack([u[k].numpy() for u in ups]), axis=0)
        np.testing.assert_allclose(merged[k].numpy(), ordered[1:5].mean(axis=0), rtol=1e-6, atol=1e-6)


def test_norm_clipping_bounds_a_diverging_member(tmp_path):
    base, ups, merged, record = _round(tmp_path, [0.1, 0.1, 0.1, 5.0], norm_clip=1.0)
    deltas = [np.concatenate([(u[k] - base[k]).numpy().ravel() for k in SHAPES]) for u in ups]
    norms = np.array([np.linalg.norm(d) for d in deltas])
    bound = np.median(norms)
    factors = np.minimum(1.0, bound / norms)
    weights = np.array([10, 11, 12, 13]) / 46
    flat_base = np.concatenate([base[k].numpy().ravel() for k in SHAPES])
    expected = flat_base + sum(w * f * d for w, f, d in zip(weights, factors, deltas, strict=True))
    got = np.concatenate([merged[k].numpy().ravel() for k in SHAPES])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert record["facilities"]["f3"]["clip"] == pytest.approx(factors[3], rel=1e-5) and factors[3] < 0.2
    assert record["facilities"]["f0"]["clip"] == 1.0


def test_robust_settings_reach_the_generated_aggregate_step(tmp_path, demo_assets):
    from ruamel.yaml import YAML

    from xffl_cwl.federation import load_federation
    from xffl_cwl.generator import generate

    extra = "  merge: trimmed_mean\n  trim: 0.25\n  norm_clip: 2.0\n"
    path = write_federation(tmp_path / "f.yml", demo_assets, ["leonardo", "lumi", "meluxina"])
    path.write_text(path.read_text().replace("aggregation:\n", "aggregation:\n" + extra))
    generate(load_federation(path), tmp_path / "run")
    step = YAML(typ="safe").load((tmp_path / "run" / "round.cwl").read_text())["steps"]["aggregate"]["in"]
    assert step["merge"]["default"] == "trimmed_mean" and step["trim"]["default"] == 0.25
    assert step["norm_clip"]["default"] == 2.0
    assert step["max_weights"]["default"] == ["leonardo=80", "lumi=80", "meluxina=80"]


HOSTILE_LINES = [
    '{"event": "trained", "facility": "lumi", "train_loss": {"first": "low"}, "steps": "many"}',
    '{"event": "trained", "facility": ' + '"' + "x" * 10000 + '", "round": 1e400}',
    '{"event": "aggregated", "rejected": [1, {"facility": {"a": 1}}], "samples": -1, "update_norm": NaN}',
    '{"event": "evaluated", "round": true, "eval_loss": "0.5"}',
    '{"event": "evaluated", "round": 2, "eval_loss": 1e999}',
    "[" * 5000,
    '{"event": ["trained"]}',
    "{not json",
]


def test_hostile_tool_output_never_crashes_the_supervisor():
    from pathlib import Path

    from xffl_cwl.execution.progress import Progress
    from xffl_cwl.execution.run_folder import RunFolder

    said: list[str] = []
    progress = Progress(RunFolder(Path("."), Path("main.cwl"), Path("inputs.yml"), {}, [], []), 1, 2, said.append)
    parser = LogParser()
    for line in HOSTILE_LINES:
        for event in parser.feed(f"2026-12-01 10:00:00.000 INFO     {line}\n") + parser.feed(line + "\n"):
            progress.handle(event)
    assert all(len(s) < 400 for s in said)
    assert any("?" in s for s in said), said  # unknown values are shown as unknown
    assert json.dumps(said)
