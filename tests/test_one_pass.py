"""One-pass aggregation: a good round reads every update once, and its result is the plain formula's.

The reference is computed here with numpy on whole tensors (load-all): elementwise arithmetic in the
same order gives the same bits whatever the chunking, so streaming must equal it bit for bit. A bad
update found late, or an update claiming another base (known only once the global model's hash is),
makes the round be written again without it: that result must equal a round that never saw it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from conftest import run_aggregate, write_global, write_update
from xffl_cwl.learning.model_dir import fingerprint

SHAPES = {"embed.weight": (40, 16), "layer.weight": (16, 16), "norm.weight": (16,)}


def _tensors(seed: int, scale: float = 1.0, base: dict | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    noise = {k: torch.randn(*s, generator=g) * scale for k, s in SHAPES.items()}
    return {k: base[k] + noise[k] for k in SHAPES} if base else noise


@pytest.fixture
def round_one(tmp_path):
    glob = write_global(tmp_path / "global", _tensors(0))
    base = _tensors(0)
    fp = fingerprint(glob)
    samples = [7, 19, 30]
    updates = [
        write_update(tmp_path / f"u{i}", f"fac{i}", _tensors(10 + i, 0.01, base), fp, samples=n)
        for i, n in enumerate(samples)
    ]
    return tmp_path, glob, updates, samples


def _reference(glob, updates, weights) -> dict[str, np.ndarray]:
    """current + sum of w_i (x_i - current), float32, whole tensors in memory."""
    current = load_file(str(glob / "model.safetensors"))
    members = [load_file(str(u / "model.safetensors")) for u in updates]
    out = {}
    for name, cur in current.items():
        acc = np.zeros_like(cur)
        for m, w in zip(members, weights, strict=True):
            delta = m[name] - cur
            delta *= np.float32(w)
            acc += delta
        acc += cur
        out[name] = acc
    return out


def _data_bytes(directory) -> int:
    header = (directory / "model.safetensors").read_bytes()
    return len(header) - 8 - int.from_bytes(header[:8], "little")


def test_streamed_fedavg_equals_load_all_reference_bit_for_bit_reading_each_update_once(round_one):
    tmp_path, glob, updates, samples = round_one
    record = run_aggregate(glob, updates, tmp_path / "out", chunk_elems=48)
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    expected = _reference(glob, updates, [n / sum(samples) for n in samples])
    for name in SHAPES:
        assert got[name].tobytes() == expected[name].tobytes(), name
    # one pass: the global model's data once, each update's once, nothing twice
    assert record["bytes_read"] == _data_bytes(glob) + sum(_data_bytes(u) for u in updates)
    assert record["fingerprint"] == fingerprint(tmp_path / "out")
    norms = {f: record["facilities"][f]["delta_norm"] for f in record["facilities"]}
    for i, u in enumerate(updates):
        mine, cur = load_file(str(u / "model.safetensors")), load_file(str(glob / "model.safetensors"))
        true = float(np.sqrt(sum(np.sum((mine[k].astype(np.float64) - cur[k]) ** 2) for k in SHAPES)))
        assert norms[f"fac{i}"] == pytest.approx(true, rel=1e-5)


def _without(tmp_path, glob, updates, tag: str) -> bytes:
    run_aggregate(glob, updates, tmp_path / tag, chunk_elems=48)
    return (tmp_path / tag / "model.safetensors").read_bytes()


def test_a_bad_value_found_late_gives_the_round_without_it(round_one):
    tmp_path, glob, updates, _ = round_one
    spoiled = _tensors(12, 0.01, _tensors(0))
    spoiled["norm.weight"][-1] = float("nan")  # the last chunk read of the last tensor
    bad = write_update(tmp_path / "bad", "facbad", spoiled, fingerprint(glob), samples=5)
    record = run_aggregate(glob, [*updates, bad], tmp_path / "with-bad", chunk_elems=48)
    assert [r["facility"] for r in record["rejected"]] == ["facbad"]
    assert "NaN or Inf" in record["rejected"][0]["reason"]
    assert (tmp_path / "with-bad" / "model.safetensors").read_bytes() == _without(tmp_path, glob, updates, "clean")


def test_an_update_claiming_another_base_is_rejected_once_the_hash_is_known(round_one):
    tmp_path, glob, updates, _ = round_one
    stale = write_update(tmp_path / "stale", "facstale", _tensors(13, 0.01, _tensors(0)), "sha256:" + "0" * 64)
    record = run_aggregate(glob, [stale, *updates], tmp_path / "with-stale", chunk_elems=48)
    assert [r["facility"] for r in record["rejected"]] == ["facstale"]
    assert "different global model" in record["rejected"][0]["reason"]
    assert set(record["facilities"]) == {"fac0", "fac1", "fac2"}
    assert (tmp_path / "with-stale" / "model.safetensors").read_bytes() == _without(tmp_path, glob, updates, "clean")
    record = json.loads((tmp_path / "with-stale" / "aggregate.json").read_text())
    assert record["base_fingerprint"] == fingerprint(glob)


def test_only_stale_updates_fail_the_quorum_naming_the_reason(round_one):
    from xffl_cwl.errors import InputError

    tmp_path, glob, _, _ = round_one
    stale = [
        write_update(tmp_path / f"s{i}", f"stale{i}", _tensors(20 + i, 0.01, _tensors(0)), "sha256:" + "1" * 64)
        for i in range(2)
    ]
    with pytest.raises(InputError, match="different global model"):
        run_aggregate(glob, stale, tmp_path / "none", chunk_elems=48)
    assert not (tmp_path / "none").exists()


def test_on_a_busy_machine_hashing_runs_in_line_with_the_same_result(round_one, monkeypatch):
    """With no idle CPU (learning/cpus.py), the fingerprint and the output's digest are computed on the
    main thread: same model, same fingerprint, same rejections."""
    import importlib

    aggregate_module = importlib.import_module("xffl_cwl.learning.aggregation.aggregate")

    tmp_path, glob, updates, _ = round_one
    threaded = run_aggregate(glob, updates, tmp_path / "threaded", chunk_elems=48)
    monkeypatch.setattr(aggregate_module, "spare_cpus", lambda: 1)
    stale = write_update(tmp_path / "stale", "facstale", _tensors(13, 0.01, _tensors(0)), "sha256:" + "0" * 64)
    inline = run_aggregate(glob, [*updates, stale], tmp_path / "inline", chunk_elems=48)
    assert inline["fingerprint"] == threaded["fingerprint"] == fingerprint(tmp_path / "inline")
    assert [r["facility"] for r in inline["rejected"]] == ["facstale"]
    assert (tmp_path / "inline" / "model.safetensors").read_bytes() == (
        tmp_path / "threaded" / "model.safetensors"
    ).read_bytes()
