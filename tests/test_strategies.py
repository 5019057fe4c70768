"""Aggregation arithmetic against numpy references computed by hand, over real update directories."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import run_aggregate, write_global, write_update
from xffl_cwl.learning.model_dir import fingerprint

SHAPES = {"w": (6, 5), "b": (5,), "h": (4, 3)}


def _random(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(*s, generator=g) for k, s in SHAPES.items()}


def _round(tmp_path, tag: str, global_dir, samples: list[int], seed: int, **kwargs):
    """One aggregation of len(samples) random updates around the global; returns (result, updates)."""
    fp = fingerprint(global_dir)
    base = load_file(str(global_dir / "model.safetensors"))
    updates, paths = [], []
    for i, n in enumerate(samples):
        delta = _random(seed * 100 + i)
        tensors = {k: base[k] + 0.1 * delta[k] for k in base}
        updates.append(tensors)
        paths.append(write_update(tmp_path / f"{tag}-u{i}", f"fac{i}", tensors, fp, samples=n))
    out = tmp_path / f"{tag}-out"
    result = run_aggregate(global_dir=global_dir, updates=paths, out=out, chunk_elems=7, **kwargs)
    return result, updates, out


def test_weighted_fedavg_equals_numpy(tmp_path):
    g = write_global(tmp_path / "g", _random(1))
    samples = [3, 10, 27]
    result, updates, out = _round(tmp_path, "r1", g, samples, seed=5)
    got = load_file(str(out / "model.safetensors"))
    w = np.array(samples, dtype=np.float64) / sum(samples)
    for k in SHAPES:
        expected = sum(w[i] * updates[i][k].double().numpy() for i in range(3))
        np.testing.assert_allclose(got[k].numpy(), expected, rtol=1e-6, atol=1e-7)
    assert (out / "config.json").is_file() and not (out / "state").exists()
    assert result["facilities"]["fac2"]["weight"] == pytest.approx(27 / 40)
    assert result["fingerprint"] == fingerprint(out)


def test_uniform_weighting(tmp_path):
    g = write_global(tmp_path / "g", _random(1))
    _, updates, out = _round(tmp_path, "r1", g, [1, 99], seed=2, weighting="uniform")
    got = load_file(str(out / "model.safetensors"))
    np.testing.assert_allclose(got["w"].numpy(), (updates[0]["w"].numpy() + updates[1]["w"].numpy()) / 2, rtol=1e-6)


def _reference_step(
    name: str, x: np.ndarray, mean: np.ndarray, state: dict, lr: float, mom: float, b1: float, b2: float, tau: float
) -> np.ndarray:
    g = x - mean
    if name == "fedavgm":
        state["m"] = mom * state.get("m", 0) + g
        return x - lr * state["m"]
    if name == "nesterov":
        state["m"] = mom * state.get("m", 0) + g
        return x - lr * (g + mom * state["m"])
    m = b1 * state.get("m", 0) + (1 - b1) * g
    if name == "fedadam":
        v = b2 * state.get("v", 0) + (1 - b2) * g * g
    else:  # fedyogi
        v0 = state.get("v", np.zeros_like(g))
        v = v0 - (1 - b2) * g * g * np.sign(v0 - g * g)
    state["m"], state["v"] = m, v
    return x - lr * m / (np.sqrt(v) + tau)


@pytest.mark.parametrize("strategy", ["fedavgm", "fedadam", "fedyogi", "nesterov"])
def test_server_optimizer_two_rounds_with_state(tmp_path, strategy):
    settings = {"server_lr": 0.5, "momentum": 0.8, "betas": (0.85, 0.95), "tau": 0.05}
    g0 = write_global(tmp_path / "g0", _random(1))
    samples = [4, 12]
    # round 1: no state
    _r1, ups1, out1 = _round(tmp_path, "r1", g0, samples, seed=11, strategy=strategy, **settings)
    assert (out1 / "state" / "state.json").is_file()
    assert json.loads((out1 / "state" / "state.json").read_text())["step"] == 1
    # round 2: state carried from round 1; the round-1 output becomes the global model
    r2, ups2, out2 = _round(tmp_path, "r2", out1, samples, seed=12, strategy=strategy, state=out1 / "state", **settings)
    assert r2["state_step"] == 2

    w = np.array(samples, dtype=np.float64) / sum(samples)
    x0 = load_file(str(g0 / "model.safetensors"))
    got1 = load_file(str(out1 / "model.safetensors"))
    got2 = load_file(str(out2 / "model.safetensors"))
    for k in SHAPES:
        state: dict = {}
        x = x0[k].double().numpy()
        mean1 = sum(w[i] * ups1[i][k].double().numpy() for i in range(2))
        x1 = _reference_step(strategy, x, mean1, state, 0.5, 0.8, 0.85, 0.95, 0.05)
        np.testing.assert_allclose(got1[k].numpy(), x1, rtol=1e-5, atol=1e-6)
        mean2 = sum(w[i] * ups2[i][k].double().numpy() for i in range(2))
        x2 = _reference_step(strategy, got1[k].double().numpy(), mean2, state, 0.5, 0.8, 0.85, 0.95, 0.05)
        np.testing.assert_allclose(got2[k].numpy(), x2, rtol=1e-5, atol=1e-6)
    # the step really used the state: without it round 2 gives something else
    fresh = run_aggregate(
        global_dir=out1,
        updates=[tmp_path / "r2-u0", tmp_path / "r2-u1"],
        out=tmp_path / "nostate",
        strategy=strategy,
        **settings,
    )
    assert fresh["fingerprint"] != r2["fingerprint"]


def test_state_from_another_strategy_is_refused(tmp_path):
    from xffl_cwl.errors import InputError

    g0 = write_global(tmp_path / "g0", _random(1))
    _, _, out1 = _round(tmp_path, "r1", g0, [1, 2], seed=3, strategy="fedadam")
    with pytest.raises(InputError, match="written by strategy 'fedadam', not 'fedyogi'"):
        _round(tmp_path, "r2", out1, [1, 2], seed=4, strategy="fedyogi", state=out1 / "state")
    assert not (tmp_path / "r2-out").exists()


def test_state_can_go_to_a_separate_directory(tmp_path):
    g0 = write_global(tmp_path / "g0", _random(1))
    _, _, out = _round(tmp_path, "r1", g0, [1, 2], seed=3, strategy="nesterov", state_out=tmp_path / "state-r1")
    assert not (out / "state").exists()
    assert (tmp_path / "state-r1" / "momentum.safetensors").is_file()
