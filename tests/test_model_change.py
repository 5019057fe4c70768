"""Data that stays where it lives: a facility rebuilds each round's global model from its own copy and
the round's change, bit for bit; lossy encodings lose nothing over rounds (error feedback); encoded
updates from facilities are untrusted and every hostile one is a clean rejection."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from safetensors.torch import load_file as load_torch
from safetensors.torch import save_file as save_torch

from conftest import write_global, write_update
from xffl_cwl.contract.options import AggregateOptions
from xffl_cwl.errors import InputError
from xffl_cwl.learning.aggregation import AggregateConfig, aggregate
from xffl_cwl.learning.deltas import BLOCK, aligned_chunks, block_count, decode, encode
from xffl_cwl.learning.model_change import rebuild
from xffl_cwl.learning.model_dir import fingerprint

SHAPES = {"embed.weight": (40, 16), "layer.weight": (33, 7), "norm.weight": (300,)}


def _tensors(seed: int, scale: float = 1.0, base: dict | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    noise = {k: torch.randn(*s, generator=g) * scale for k, s in SHAPES.items()}
    out = {k: base[k] + noise[k] for k in SHAPES} if base else noise
    out["layer.weight"] = out["layer.weight"].to(torch.bfloat16)  # a bf16 tensor among fp32 ones
    out["position_ids"] = torch.arange(12)  # never changes: not part of a change
    return out


def _round(tmp_path, glob, tag: str, encoding: str, strategy: str = "fedavg", state=None, seeds=(1, 2)):
    """Two facilities' updates around `glob`, aggregated with a change for them; returns (out, change, record)."""
    base = load_torch(str(glob / "model.safetensors"))
    fp = fingerprint(glob)
    updates = []
    for i, seed in enumerate(seeds):
        moved = _tensors(seed, 0.05, {k: v.float() for k, v in base.items() if k != "position_ids"})
        updates.append(f"f{i}=" + str(write_update(tmp_path / f"{tag}-u{i}", f"f{i}", moved, fp, samples=10 + i)))
    options = AggregateOptions(downlink=encoding, strategy=strategy)
    out, change = tmp_path / f"{tag}-model", tmp_path / f"{tag}-change"
    record = aggregate(AggregateConfig(glob, updates, out, options, state=state, change_out=change, chunk_elems=64))
    return out, change, record


def test_int8_and_bf16_encodings_stay_within_their_bounds():
    g = np.random.default_rng(0)
    change = (
        g.standard_normal(5 * BLOCK + 17) * np.repeat(10.0 ** g.integers(-6, 3, 6), BLOCK)[: 5 * BLOCK + 17]
    ).astype(np.float32)
    change[3 * BLOCK : 4 * BLOCK] = 0.0  # an all-zero block
    q, scales = encode(change, "int8")
    assert q.dtype == np.int8 and scales.shape == (block_count(change.size),)
    back = decode(q, scales, "int8")
    per_element = np.repeat(scales, BLOCK)[: change.size]
    assert np.all(np.abs(back - change) <= per_element * 0.5 + 1e-12)
    assert np.all(back[3 * BLOCK : 4 * BLOCK] == 0)
    # decoding any range needs only the scales of its blocks
    start, count = BLOCK + 5, 2 * BLOCK
    first, n = start // BLOCK, (start + count - 1) // BLOCK - start // BLOCK + 1
    assert np.array_equal(
        decode(q[start : start + count], scales[first : first + n], "int8", start), back[start : start + count]
    )
    bf, _ = encode(change, "bf16")
    assert np.all(np.abs(decode(bf, None, "bf16") - change) <= np.abs(change) * 2.0**-8)
    assert np.array_equal(decode(*encode(change, "fp32"), "fp32"), change)


@pytest.mark.parametrize("shape", [(300,), (40, 16), (33, 7), (5, 3, 2), (1,)])
def test_aligned_chunks_cover_whole_rows_on_block_boundaries(shape):
    numel = int(np.prod(shape))
    row = numel // shape[0] if len(shape) > 1 else 1
    chunks = list(aligned_chunks(shape, 64))
    assert sum(c for _, c in chunks) == numel and chunks[0][0] == 0
    for (start, count), nxt in zip(chunks, [*chunks[1:], (numel, 0)], strict=True):
        assert start % BLOCK == 0 and start % row == 0 and start + count == nxt[0]


@pytest.mark.parametrize("encoding", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("strategy", ["fedavg", "fedadam"])
def test_a_facility_rebuilds_the_global_model_bit_for_bit(tmp_path, encoding, strategy):
    glob = write_global(tmp_path / "g0", _tensors(0))
    state, current = None, glob
    for rnd in (1, 2):  # the second round carries the residual (and the optimizer state)
        out, change, record = _round(tmp_path, current, f"r{rnd}", encoding, strategy, state, seeds=(rnd, rnd + 10))
        rebuilt = rebuild(current, change, tmp_path / f"r{rnd}-local")
        assert rebuilt == record.fingerprint == fingerprint(out)
        assert (tmp_path / f"r{rnd}-local" / "model.safetensors").read_bytes() == (
            out / "model.safetensors"
        ).read_bytes()
        assert record.change.kind == "delta" and record.change.encoding == encoding
        names = set(load_torch(str(change / "delta.safetensors")))
        assert names == set(SHAPES)  # position_ids never moves
        state = out / "state" if (out / "state").is_dir() else None
        current = out
    if encoding == "fp32" and strategy == "fedavg":
        assert state is None  # nothing to carry: no optimizer state, no residual


def test_error_feedback_sends_everything_over_the_rounds(tmp_path):
    """What int8 did not send in round 1 is sent in round 2: the sum of what the facilities applied plus the
    residual left equals the sum of what the strategy wanted, to float32 rounding."""
    glob = write_global(tmp_path / "g0", _tensors(0))
    wanted_total = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    current, state = glob, None
    for rnd in (1, 2):
        lossless, _, _ = _round(tmp_path, current, f"x{rnd}", "fp32", seeds=(rnd, rnd + 10))
        out, _, _ = _round(tmp_path, current, f"q{rnd}", "int8", state=state, seeds=(rnd, rnd + 10))
        before, want = _model(current), _model(lossless)
        for k in SHAPES:
            wanted_total[k] += _f32(want[k]) - _f32(before[k])
        state, current = out / "state", out
    residual = load_file(str(state / "downlink_residual.safetensors"))
    first, last = _model(glob), _model(current)
    for k in ("embed.weight", "norm.weight"):  # fp32 tensors: the lossless reference of a bf16 one is rounded itself
        applied = _f32(last[k]) - _f32(first[k])
        scale = np.abs(wanted_total[k]).max()
        assert np.abs(applied + residual[k] - wanted_total[k]).max() <= 1e-5 * scale + 1e-6, k


def _model(directory) -> dict[str, torch.Tensor]:
    return load_torch(str(directory / "model.safetensors"))


def _f32(values: torch.Tensor) -> np.ndarray:
    return values.float().numpy()


def test_a_facility_with_the_current_model_links_it_and_a_stranger_is_refused(tmp_path):
    glob = write_global(tmp_path / "g0", _tensors(0))
    out, change, _ = _round(tmp_path, glob, "r1", "int8")
    assert rebuild(out, change, tmp_path / "already") == fingerprint(out)  # sent the whole model: nothing to apply
    other = write_global(tmp_path / "other", _tensors(7))
    with pytest.raises(InputError, match="neither the model the change"):
        rebuild(other, change, tmp_path / "stranger")
    assert not (tmp_path / "stranger").exists()
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for path in change.iterdir():
        (damaged / path.name).write_bytes(path.read_bytes())
    data = bytearray((damaged / "delta.safetensors").read_bytes())
    data[-3] ^= 0x40
    (damaged / "delta.safetensors").write_bytes(bytes(data))
    with pytest.raises(InputError, match="damaged"):
        rebuild(glob, damaged, tmp_path / "from-damaged")
    assert not (tmp_path / "from-damaged").exists()


# --- encoded updates: untrusted bytes from a facility -------------------------------------------------


def _encoded_update(tmp_path, glob, name: str, encoding: str = "int8", seed: int = 3):
    """An int8/bf16 update written as a facility's train step writes it (through the same encoder)."""
    fp = fingerprint(glob)
    current = _model(glob)
    g = np.random.default_rng(seed)
    out = tmp_path / name
    out.mkdir()
    values, scales = {}, {}
    for k in SHAPES:
        q, s = encode((g.standard_normal(current[k].numel()) * 0.05).astype(np.float32), encoding)
        values[k] = q.reshape(tuple(current[k].shape))
        if s is not None:
            scales[k] = s
    as_torch = {
        k: torch.from_numpy(v.view(np.int16)).view(torch.bfloat16) if v.dtype == np.uint16 else torch.from_numpy(v)
        for k, v in values.items()
    }
    save_torch(as_torch, str(out / "delta.safetensors"), metadata={"format": "pt"})
    if scales:
        save_file(scales, str(out / "delta_scales.safetensors"), metadata={"format": "pt"})
    record = {
        "format": "xffl-update", "version": 1, "facility": name, "round": 1, "mode": "full", "samples": 10,
        "tokens": 100, "steps": 1, "base_fingerprint": fp, "encoding": encoding,
        "train_loss": {"first": 2.0, "last": 1.0, "mean": 1.5}, "eval_loss": {"before": 2.0, "after": 1.0},
    }  # fmt: skip
    (out / "update.json").write_text(json.dumps(record))
    return out


def _raw_safetensors(path, header: dict, data: bytes) -> None:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def _spoil(case: str, path) -> None:
    scales = path / "delta_scales.safetensors"
    delta = path / "delta.safetensors"
    if case == "nan-scale":
        s = load_file(str(scales))
        s["norm.weight"][1] = np.nan
        save_file(s, str(scales))
    elif case == "inf-scale":
        s = load_file(str(scales))
        s["embed.weight"][0] = np.inf
        save_file(s, str(scales))
    elif case == "no-scales":
        scales.unlink()
    elif case == "short-scales":
        s = load_file(str(scales))
        s["norm.weight"] = s["norm.weight"][:1]
        save_file(s, str(scales))
    elif case == "float-values":  # F32 where the int8 encoding says I8
        d = {k: v.astype(np.float32) for k, v in load_file(str(delta)).items()}
        save_file(d, str(delta))
    elif case == "missing-tensor":
        d = load_file(str(delta))
        del d["layer.weight"]
        save_file(d, str(delta))
    elif case == "extra-tensor":
        d = load_file(str(delta))
        d["position_ids"] = np.zeros(12, np.int8)
        save_file(d, str(delta))
    elif case == "overlapping-bytes":  # written by hand: two tensors claim the same bytes
        n = 40 * 16
        _raw_safetensors(
            delta,
            {
                "embed.weight": {"dtype": "I8", "shape": [40, 16], "data_offsets": [0, n]},
                "layer.weight": {"dtype": "I8", "shape": [33, 7], "data_offsets": [0, 231]},
                "norm.weight": {"dtype": "I8", "shape": [300], "data_offsets": [n, n + 300]},
            },
            b"\x01" * (n + 300),
        )
    elif case == "truncated":
        delta.write_bytes(delta.read_bytes()[:-50])
    elif case in ("lora-int8", "int4"):
        record = json.loads((path / "update.json").read_text())
        record["encoding"] = "int4" if case == "int4" else "int8"
        record["mode"] = "lora" if case == "lora-int8" else "full"
        (path / "update.json").write_text(json.dumps(record))


HOSTILE = {
    "nan-scale": "NaN or Inf",
    "inf-scale": "NaN or Inf",
    "no-scales": "delta_scales",
    "short-scales": "block scales",
    "float-values": "its int8 change must be I8",
    "missing-tensor": "missing from its encoded change",
    "extra-tensor": "not a float tensor of the global model",
    "overlapping-bytes": "not a valid safetensors file",
    "truncated": "not a valid safetensors file",
    "lora-int8": "encoding",
    "int4": "encoding",
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_encoded_update_is_left_out_and_the_round_goes_on(tmp_path, case):
    glob = write_global(tmp_path / "g0", {k: v for k, v in _tensors(0).items()})
    good = [_encoded_update(tmp_path, glob, f"good{i}", seed=i) for i in range(2)]
    bad = _encoded_update(tmp_path, glob, "bad", seed=9)
    _spoil(case, bad)
    sources = [f"{p.name}={p}" for p in [*good, bad]]
    record = aggregate(AggregateConfig(glob, sources, tmp_path / "out", AggregateOptions(), chunk_elems=64))
    assert set(record.facilities) == {"good0", "good1"}
    assert [r.facility for r in record.rejected] == ["bad"]
    assert HOSTILE[case] in record.rejected[0].reason
    clean = aggregate(AggregateConfig(glob, sources[:2], tmp_path / "clean", AggregateOptions(), chunk_elems=64))
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (
        tmp_path / "clean" / "model.safetensors"
    ).read_bytes()
    assert clean.fingerprint == record.fingerprint


def test_encoded_updates_merge_as_their_decoded_changes(tmp_path):
    glob = write_global(tmp_path / "g0", _tensors(0))
    ups = [_encoded_update(tmp_path, glob, f"e{i}", encoding, seed=i) for i, encoding in enumerate(["int8", "bf16"])]
    record = aggregate(
        AggregateConfig(glob, [f"{u.name}={u}" for u in ups], tmp_path / "out", AggregateOptions(), chunk_elems=64)
    )
    got, base = _model(tmp_path / "out"), _model(glob)
    for k in SHAPES:
        changes = []
        for u, encoding in zip(ups, ["int8", "bf16"], strict=True):
            stored = load_torch(str(u / "delta.safetensors"))[k].reshape(-1)
            q = stored.view(torch.int16).numpy().view(np.uint16) if encoding == "bf16" else stored.numpy()
            s = load_file(str(u / "delta_scales.safetensors"))[k] if encoding == "int8" else None
            changes.append(decode(q, s, encoding))
        expected = _f32(base[k]).reshape(-1) + 0.5 * changes[0] + 0.5 * changes[1]
        np.testing.assert_allclose(
            _f32(got[k]).reshape(-1), expected, rtol=1e-2 if k == "layer.weight" else 1e-6, atol=1e-6
        )
    assert record.facilities["e0"].delta_norm > 0
