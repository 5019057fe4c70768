"""Our streaming reader/writer against the real safetensors library."""

from __future__ import annotations

import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from xffl_cwl.errors import InputError
from xffl_cwl.learning.safetensors_stream import (
    ShardWriter,
    TensorReader,
    TensorSpec,
    read_checkpoint,
    read_shard,
    row_chunks,
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
            got = torch.cat(pieces) if pieces else torch.empty(0, dtype=expected.dtype)
            assert got.dtype == expected.dtype
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
