"""Our streaming reader/writer against the real safetensors library."""

from __future__ import annotations

import gc
import hashlib
import struct
import threading
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from xffl_cwl.errors import InputError
from xffl_cwl.learning.safetensors_stream import (
    NUMPY_DTYPES,
    ShardWriter,
    TensorReader,
    TensorSpec,
    from_f32,
    read_checkpoint,
    read_shard,
    row_chunks,
    to_f32,
)


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "emb": torch.randn(37, 16, generator=g),
        "bias": torch.randn(5, generator=g).to(torch.bfloat16),
        "half": torch.randn(3, 4, 5, generator=g).half(),
        "steps": torch.arange(7, dtype=torch.int64),
        "empty": torch.zeros(0, 4),
    }


def test_chunked_reads_match_safetensors(tmp_path):
    tensors = _tensors()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    ckpt = read_checkpoint(tmp_path)
    with TensorReader() as reader:
        for name, expected in tensors.items():
            entry = ckpt.by_name[name]
            pieces = [reader.read(entry, s, c) for s, c in row_chunks(entry.shape, 48)]
            raw = np.concatenate(pieces) if pieces else np.empty(0, dtype=NUMPY_DTYPES[entry.dtype])
            assert raw.dtype == NUMPY_DTYPES[entry.dtype]
            got = torch.from_numpy(raw).view(expected.dtype)
            assert torch.equal(got.view(expected.shape), expected), name


def test_chunked_writes_load_in_safetensors(tmp_path):
    tensors = _tensors()
    specs = [
        TensorSpec(
            n,
            {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64"}[t.dtype],
            tuple(t.shape),
        )
        for n, t in tensors.items()
    ]
    writer = ShardWriter(tmp_path / "out.safetensors", specs, {"format": "pt", "note": "x"})
    for name, tensor in tensors.items():
        flat = tensor.reshape(-1)
        for start, count in row_chunks(tuple(tensor.shape), 20):
            writer.write(name, flat[start : start + count])
    digest = writer.close()
    loaded = load_file(str(tmp_path / "out.safetensors"))
    assert set(loaded) == set(tensors)
    for name in tensors:
        assert torch.equal(loaded[name], tensors[name])
    assert len(digest) == 64


def test_float32_conversions_equal_torch_bit_for_bit():
    """bf16 has no numpy type: to_f32/from_f32 must widen and round (to nearest even) exactly as torch does."""
    g = torch.Generator().manual_seed(3)
    specials = [0.0, -0.0, 1.0, 1.00390625, 1.005859375, 3.0e38, -3.4e38, 1e-40, float("inf"), float("-inf")]
    values = torch.cat(
        [torch.randn(4096, generator=g) * 10.0 ** torch.randint(-30, 30, (4096,), generator=g), torch.tensor(specials)]
    )
    ties = torch.arange(0, 1 << 16, dtype=torch.int32).mul(1 << 16).add(1 << 15).view(torch.float32)  # exactly halfway
    values = torch.cat([values, ties[torch.isfinite(ties)]]).float()
    for code, dtype in (("BF16", torch.bfloat16), ("F16", torch.float16), ("F64", torch.float64)):
        ours = from_f32(values.numpy(), code)
        theirs = values.to(dtype)
        assert torch.equal(torch.from_numpy(ours).view(dtype), theirs) or (
            code != "BF16" and np.array_equal(ours, theirs.numpy(), equal_nan=True)
        ), code
        back = to_f32(ours, code)
        assert back.dtype == np.float32
        assert np.array_equal(back, theirs.float().numpy(), equal_nan=True), code
    nan = from_f32(np.array([float("nan"), -float("nan")], dtype=np.float32), "BF16")
    assert np.isnan(to_f32(nan, "BF16")).all()


def test_numpy_chunks_and_reused_buffers(tmp_path):
    values = np.arange(30, dtype=np.float32)
    writer = ShardWriter(tmp_path / "n.safetensors", [TensorSpec("a", "F32", (5, 6)), TensorSpec("b", "BF16", (4,))])
    writer.write("a", values[:12])
    writer.write("a", values[12:])
    with pytest.raises(RuntimeError, match=r"expected b \(BF16\)"):
        writer.write("b", values[:4])  # float32 where bf16 bits are due
    writer = ShardWriter(tmp_path / "n.safetensors", [TensorSpec("a", "F32", (5, 6)), TensorSpec("b", "BF16", (4,))])
    writer.write("a", values)
    writer.write("b", from_f32(values[:4], "BF16"))
    digest = writer.close()
    assert digest == hashlib.sha256((tmp_path / "n.safetensors").read_bytes()).hexdigest()
    entry = read_checkpoint(tmp_path, "n").by_name["a"]
    buffer = np.full(64, -1.0, dtype=np.float32)
    with TensorReader() as reader:
        got = reader.read(entry, 6, 12, into=buffer)
        assert np.array_equal(got, values[6:18]) and np.shares_memory(got, buffer)
        assert not np.shares_memory(reader.read(entry, 0, 6, into=np.empty(3, dtype=np.float32)), buffer)


def test_abandoned_writer_stops_its_hash_thread(tmp_path):
    before = threading.active_count()
    for i in range(20):
        writer = ShardWriter(tmp_path / f"{i}.safetensors", [TensorSpec("a", "F32", (4,))])
        writer.write("a", np.zeros(2, dtype=np.float32))
        del writer  # dropped half-way, as a rejected round's output is
    gc.collect()
    deadline = time.monotonic() + 5
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() <= before


def test_row_chunks_keep_whole_rows():
    chunks = list(row_chunks((10, 7), 20))
    assert [c for _, c in chunks] == [14, 14, 14, 14, 14]
    assert list(row_chunks((3, 100), 10)) == [(0, 100), (100, 100), (200, 100)]
    assert sum(c for _, c in row_chunks((11,), 4)) == 11


def test_writer_refuses_short_tensor(tmp_path):
    writer = ShardWriter(tmp_path / "x.safetensors", [TensorSpec("a", "F32", (4,))])
    writer.write("a", torch.zeros(2))
    with pytest.raises(RuntimeError, match="not fully written"):
        writer.close()


def test_corrupt_headers_are_input_errors(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x01\x02")
    with pytest.raises(InputError, match="shorter than 8 bytes"):
        read_shard(bad, bad.name)
    bad.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(InputError, match="header length"):
        read_shard(bad, bad.name)
    bad.write_bytes(struct.pack("<Q", 4) + b"nope")
    with pytest.raises(InputError, match="not JSON"):
        read_shard(bad, bad.name)
    header = b'{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}'
    bad.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    with pytest.raises(InputError, match="offsets"):
        read_shard(bad, bad.name)


def test_sharded_checkpoint_is_read_through_its_index(tmp_path):
    import json

    save_file({"a": torch.ones(3)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"b": torch.zeros(2, 2)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps(
            {
                "metadata": {},
                "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"},
            }
        )
    )
    ckpt = read_checkpoint(tmp_path)
    assert ckpt.relpaths == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert ckpt.by_name["b"].shape == (2, 2)
    assert ckpt.index_name == "model.safetensors.index.json"
