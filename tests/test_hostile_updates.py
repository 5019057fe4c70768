"""Untrusted update directories, crafted by hand as raw bytes: each is left out with one line naming
its facility and what is wrong, never the round. The good updates of the same round are merged,
bit for bit as if the hostile one had never been sent; below --min-updates nothing is written.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import REPO, write_global, write_update
from xffl_cwl.cli import cli
from xffl_cwl.learning.model_dir import fingerprint

SHAPES = {"layer.weight": (4, 3), "layer.bias": (4,)}


def _base() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(*s, generator=g) for k, s in SHAPES.items()}


def st_bytes(header: dict | bytes, data: bytes, header_len: int | None = None) -> bytes:
    """A safetensors file as raw bytes: 8-byte length, header, data (nothing checks what we write)."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data


def _valid_header() -> tuple[dict, bytes]:
    """The header and data a correct update has, to corrupt one piece at a time."""
    weight = (torch.ones(4, 3) * 0.5).numpy().tobytes()
    bias = (torch.ones(4) * 0.25).numpy().tobytes()
    header = {
        "__metadata__": {"format": "pt"},
        "layer.bias": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "layer.weight": {"dtype": "F32", "shape": [4, 3], "data_offsets": [16, 64]},
    }
    return header, bias + weight


def _with(**changes) -> Callable[[Path], None]:
    """Rewrite the update's weights from the valid header with some entries replaced."""

    def write(d: Path) -> None:
        header, data = _valid_header()
        for key, value in changes.items():
            name, _, field = key.partition("__")
            if key.startswith("__"):
                header[key] = value
            elif field:
                header[name.replace("_", ".")][field] = value
            else:
                header[name] = value
        (d / "model.safetensors").write_bytes(st_bytes(header, data))

    return write


def _raw(header: bytes, data: bytes | None = None, header_len: int | None = None) -> Callable[[Path], None]:
    def write(d: Path) -> None:
        (d / "model.safetensors").write_bytes(
            st_bytes(header, _valid_header()[1] if data is None else data, header_len)
        )

    return write


def _record(**changes) -> Callable[[Path], None]:
    def write(d: Path) -> None:
        record = json.loads((d / "update.json").read_text())
        record.update(changes)
        (d / "update.json").write_text(json.dumps(record))

    return write


def _record_text(text: str) -> Callable[[Path], None]:
    def write(d: Path) -> None:
        (d / "update.json").write_text(text)

    return write


def _symlink_weights_to_global(d: Path) -> None:
    (d / "model.safetensors").unlink()
    (d / "model.safetensors").symlink_to(d.parent.parent / "global" / "model.safetensors")


def _update_json_devzero(d: Path) -> None:
    (d / "update.json").unlink()
    (d / "update.json").symlink_to("/dev/zero")


def _update_json_fifo(d: Path) -> None:
    (d / "update.json").unlink()
    os.mkfifo(d / "update.json")


def _weights_fifo(d: Path) -> None:
    (d / "model.safetensors").unlink()
    os.mkfifo(d / "model.safetensors")


def _weights_directory(d: Path) -> None:
    (d / "model.safetensors").unlink()
    (d / "model.safetensors").mkdir()


def _index(weight_map: object, shard_bytes: bytes | None = None) -> Callable[[Path], None]:
    def write(d: Path) -> None:
        (d / "model.safetensors").rename(d / "model-00001-of-00001.safetensors")
        if shard_bytes is not None:
            (d / "model-00001-of-00001.safetensors").write_bytes(shard_bytes)
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    return write


def _nan_values(d: Path) -> None:
    header, data = _valid_header()
    data = bytearray(data)
    data[16:20] = struct.pack("<f", float("nan"))
    (d / "model.safetensors").write_bytes(st_bytes(header, bytes(data)))


NESTED = b"[" * 30_000 + b"]" * 30_000  # below the header size bound: the nesting itself is refused
HUGE_PADDING = b'{"__metadata__": {"format": "pt"}' + b" " * (39 * 1024 * 1024) + b"}"

# name -> (how the update directory is made hostile, what the one line must say)
CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "negative offset": (_with(layer_bias__data_offsets=[-16, 0]), "must be a non-negative JSON integer"),
    "float offset": (_with(layer_bias__data_offsets=[0.0, 16]), "must be a non-negative JSON integer"),
    "string offset": (_with(layer_bias__data_offsets=["0", 16]), "must be a non-negative JSON integer"),
    "boolean offset": (_with(layer_bias__data_offsets=[False, 16]), "must be a non-negative JSON integer"),
    "three offsets": (_with(layer_bias__data_offsets=[0, 8, 16]), "data_offsets must be [begin, end]"),
    "begin after end": (_with(layer_bias__data_offsets=[16, 0]), "does not hold [4] of F32"),
    "Infinity in a shape": (
        _raw(b'{"layer.bias":{"dtype":"F32","shape":[Infinity],"data_offsets":[0,16]}}'),
        "Infinity is not JSON",
    ),
    "NaN in a header": (_raw(b'{"layer.bias":{"dtype":"F32","shape":[4],"data_offsets":[0,NaN]}}'), "NaN is not JSON"),
    "huge integer": (
        _raw(b'{"layer.bias":{"dtype":"F32","shape":[4],"data_offsets":[0,' + b"9" * 5000 + b"]}}"),
        "is too long",
    ),
    "dtype is a list": (_with(layer_bias__dtype=["F32"]), "which xffl-cwl does not handle"),
    "unknown dtype": (_with(layer_bias__dtype="F8_E4M3"), "which xffl-cwl does not handle"),
    "shape not a list": (_with(layer_bias__shape=4), "a shape that is not a list"),
    "negative dimension": (_with(layer_bias__shape=[-4]), "must be a non-negative JSON integer"),
    "shape and bytes disagree": (_with(layer_bias__shape=[5]), "does not hold [5] of F32"),
    "extra field in a tensor": (_with(layer_bias__extra=1), "must have exactly dtype, shape and data_offsets"),
    "metadata not a mapping": (_with(__metadata__=["format", "pt"]), "__metadata__ must map strings to strings"),
    "metadata not flat": (_with(__metadata__={"format": {"nested": "pt"}}), "__metadata__ must map strings to strings"),
    "deeply nested header": (_raw(NESTED), "nested too deeply"),
    "header not UTF-8": (_raw(b'{"layer.bias\xff":{}}'), "not UTF-8"),
    "header not JSON": (_raw(b"{this is not json}"), "is not JSON"),
    "header not an object": (_raw(b"[1, 2, 3]"), "is not a JSON object"),
    "duplicate tensor name": (
        _raw(
            b'{"layer.bias":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},'
            b'"layer.bias":{"dtype":"F32","shape":[4],"data_offsets":[16,32]}}'
        ),
        "appears twice",
    ),
    "overlapping tensors": (_with(layer_weight__data_offsets=[8, 56]), "overlaps the previous one"),
    "hole between tensors": (
        _raw(
            b'{"layer.bias":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},'
            b'"layer.weight":{"dtype":"F32","shape":[4,3],"data_offsets":[24,72]}}',
            data=b"\0" * 72,
        ),
        "leaves a hole of 8 bytes",
    ),
    "trailing bytes": (
        _raw(json.dumps(_valid_header()[0]).encode(), data=_valid_header()[1] + b"x" * 8),
        "the file holds 72",
    ),
    "header length beyond the file": (_raw(b"{}", header_len=10_000), "is impossible"),
    "header length of 2^63": (_raw(b"{}", header_len=2**63), "is impossible"),
    "39 MB header": (_raw(HUGE_PADDING, data=b""), "is impossible or over"),
    "shorter than 8 bytes": (lambda d: (d / "model.safetensors").write_bytes(b"\x01\x02"), "shorter than 8 bytes"),
    "NaN values": (_nan_values, "holds NaN or Inf values"),
    "weights are a symlink to the global": (_symlink_weights_to_global, "is a symbolic link"),
    "weights are a FIFO": (_weights_fifo, "is a FIFO"),
    "weights are a directory": (_weights_directory, "is a directory"),
    "index maps to a number": (
        _index({"layer.bias": 1, "layer.weight": "model-00001-of-00001.safetensors"}),
        "which is not a shard file",
    ),
    "index maps to a NUL path": (
        _index({"layer.bias": "model.safetensors\x00/../../global/model.safetensors", "layer.weight": "x.safetensors"}),
        "which is not a shard file",
    ),
    "index escapes the folder": (
        _index({"layer.bias": "../global/model.safetensors", "layer.weight": "../global/model.safetensors"}),
        "which is not a shard file",
    ),
    "index lists a tensor its shard lacks": (
        _index(
            {
                "layer.bias": "model-00001-of-00001.safetensors",
                "layer.weight": "model-00001-of-00001.safetensors",
                "ghost": "model-00001-of-00001.safetensors",
            }
        ),
        "which does not hold it",
    ),
    "index not JSON": (
        lambda d: (d / "model.safetensors.index.json").write_text("{"),
        "is not a valid safetensors index",
    ),
    "update.json is /dev/zero": (_update_json_devzero, "update.json is a symbolic link"),
    "update.json is a FIFO": (_update_json_fifo, "update.json is a FIFO"),
    "update.json is huge": (_record_text(" " * (1024 * 1024) + "{}"), "more than the 65536 bytes"),
    "update.json not an object": (_record_text("[]"), "update.json: must be a JSON object"),
    "update.json duplicate key": (
        lambda d: (d / "update.json").write_text((d / "update.json").read_text()[:-1] + ', "samples": 1}'),
        "the key 'samples' appears twice",
    ),
    "samples 10**400": (
        lambda d: (d / "update.json").write_text(
            (d / "update.json").read_text().replace('"samples": 12', '"samples": 1' + "0" * 400)
        ),
        "is too long",
    ),
    "samples beyond 2^53": (_record(samples=10**17), "update.json samples: must be an integer in [0, 2^53]"),
    "samples as a string": (_record(samples="10"), "update.json samples: must be an integer"),
    "samples as a float": (_record(samples=1e18), "update.json samples: must be an integer"),
    "NaN loss": (
        lambda d: (d / "update.json").write_text(
            (d / "update.json").read_text().replace('"first": 1.0', '"first": NaN')
        ),
        "NaN is not JSON",
    ),
    "loss not a number": (
        _record(train_loss={"first": "low", "last": 0.5, "mean": 0.7}),
        "update.json train_loss.first",
    ),
    "claims another facility": (_record(facility="leonardo"), "says it comes from 'leonardo'"),
    "wrong format": (_record(format="pickle"), "update.json format"),
    "mode not known": (_record(mode="both"), "update.json mode"),
    "fingerprint not a digest": (_record(base_fingerprint="sha256:../../x"), "is not sha256:<64 hex digits>"),
    "container not an object": (_record(container="podman"), "update.json container: must be a JSON object"),
    "container image with a newline": (
        lambda d: (d / "update.json").write_text(
            (d / "update.json").read_text()[:-1] + ', "container": {"image": "img\\n\\u001b[2Jx"}}'
        ),
        "update.json container.image: must be printable text without spaces",
    ),
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A global model, two good updates and the model they make on their own."""
    root = tmp_path_factory.mktemp("hostile")
    gdir = write_global(root / "global", _base())
    fp = fingerprint(gdir)
    goods = [
        write_update(root / "good" / name, name, {k: v + 0.1 * (i + 1) for k, v in _base().items()}, fp, samples=10 + i)
        for i, name in enumerate(("leonardo", "lumi"))
    ]
    reference = root / "reference"
    result = CliRunner().invoke(cli, ["aggregate", "--global", str(gdir), "--out", str(reference), *_updates(goods)])
    assert result.exit_code == 0, result.stderr
    return root, gdir, goods, (reference / "model.safetensors").read_bytes()


def _complaints(caplog) -> list[str]:
    """The rejection lines the aggregator printed (its log records, one line each)."""
    lines = [r.getMessage() for r in caplog.records if "rejected:" in r.getMessage()]
    assert all("\n" not in line for line in lines)
    return lines


def _updates(paths) -> list[str]:
    return [a for p in paths for a in ("--update", str(p))]


def _hostile(root: Path, gdir: Path, make: Callable[[Path], None]) -> Path:
    d = root / "hostile" / "vega"
    if d.exists() or d.is_symlink():
        shutil.rmtree(d) if d.is_dir() and not d.is_symlink() else d.unlink()
    write_update(d, "vega", {k: v + 0.3 for k, v in _base().items()}, fingerprint(gdir), samples=12)
    make(d)
    return d


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_update_is_left_out_and_the_round_goes_on(world, case, tmp_path, caplog):
    _root, gdir, goods, reference = world
    make, expected = CASES[case]
    vega = _hostile(tmp_path, gdir, make)
    out = tmp_path / "next"
    result = CliRunner().invoke(cli, ["aggregate", "--global", str(gdir), "--out", str(out), *_updates([*goods, vega])])
    assert result.exit_code == 0, result.stderr
    complaints = _complaints(caplog)
    assert len(complaints) == 1 and "'vega'" in complaints[0] and expected in complaints[0], complaints
    record = json.loads(
        (out / "aggregate.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in aggregate.json")
    )
    assert sorted(record["facilities"]) == ["leonardo", "lumi"]
    assert [r["facility"] for r in record["rejected"]] == ["vega"] and expected in record["rejected"][0]["reason"]
    assert (out / "model.safetensors").read_bytes() == reference, (
        "the good updates must merge as if vega had sent nothing"
    )


@pytest.mark.parametrize(
    "case", ["deeply nested header", "update.json is a FIFO", "NaN values", "claims another facility"]
)
def test_below_quorum_nothing_is_written(world, case, tmp_path):
    _root, gdir, goods, _ = world
    vega = _hostile(tmp_path, gdir, CASES[case][0])
    out = tmp_path / "next"
    args = ["aggregate", "--global", str(gdir), "--out", str(out), "--min-updates", "3", *_updates([*goods, vega])]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "only 2 valid update(s) of 3, --min-updates is 3" in errors[0] and "vega: " in errors[0]
    assert not out.exists() and not list(tmp_path.glob(".next.*"))


def test_the_global_model_itself_is_not_an_update(world, tmp_path, caplog):
    _root, gdir, goods, reference = world
    link = tmp_path / "vega"
    link.symlink_to(gdir)
    out = tmp_path / "next"
    result = CliRunner().invoke(cli, ["aggregate", "--global", str(gdir), "--out", str(out), *_updates([*goods, link])])
    assert result.exit_code == 0 and "it is the global model directory itself" in " ".join(_complaints(caplog))
    assert (out / "model.safetensors").read_bytes() == reference


def test_a_second_update_under_the_same_name_is_refused(world, tmp_path, caplog):
    _root, gdir, goods, reference = world
    twin = write_update(tmp_path / "twin", "lumi", {k: v * 100 for k, v in _base().items()}, fingerprint(gdir))
    out = tmp_path / "next"
    result = CliRunner().invoke(
        cli, ["aggregate", "--global", str(gdir), "--out", str(out), *_updates(goods), "--update", f"lumi={twin}"]
    )
    assert result.exit_code == 0 and "a second update from the same facility" in " ".join(_complaints(caplog))
    assert (out / "model.safetensors").read_bytes() == reference


def test_declared_weight_is_capped_by_the_workflow(world, tmp_path):
    """A facility that claims 2^53 samples counts what the workflow says it could have trained."""
    _root, gdir, goods, _ = world
    greedy = _hostile(tmp_path, gdir, _record(samples=2**53))
    out = tmp_path / "next"
    caps = ["--max-weight", "leonardo=40", "--max-weight", "lumi=40", "--max-weight", "vega=40"]
    result = CliRunner().invoke(
        cli, ["aggregate", "--global", str(gdir), "--out", str(out), *_updates([*goods, greedy]), *caps]
    )
    assert result.exit_code == 0, result.stderr
    facilities = json.loads((out / "aggregate.json").read_text())["facilities"]
    assert facilities["vega"]["capped"] is True and facilities["vega"]["basis"] == 40
    assert facilities["vega"]["weight"] == pytest.approx(40 / (10 + 11 + 40))
    fixed = CliRunner().invoke(
        cli,
        ["aggregate", "--global", str(gdir), "--out", str(tmp_path / "fixed"), *_updates([*goods, greedy]),
         "--weight", "leonardo=1", "--weight", "lumi=1", "--weight", "vega=2"],
    )  # fmt: skip
    assert fixed.exit_code == 0, fixed.stderr
    assert json.loads((tmp_path / "fixed" / "aggregate.json").read_text())["facilities"]["vega"]["weight"] == 0.5


def test_a_huge_finite_update_that_would_make_the_model_infinite_is_left_out(world, tmp_path):
    _root, gdir, goods, _ = world
    huge = write_update(
        tmp_path / "vega",
        "vega",
        {k: torch.full_like(v, 3e38) for k, v in _base().items()},
        fingerprint(gdir),
        samples=10**6,
    )
    out = tmp_path / "next"
    args = ["aggregate", "--global", str(gdir), "--out", str(out), "--strategy", "nesterov", *_updates([*goods, huge])]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.stderr
    record = json.loads((out / "aggregate.json").read_text())
    assert [r["facility"] for r in record["rejected"]] == ["vega"]
    assert "of the next global model non-finite" in record["rejected"][0]["reason"]
    reference = tmp_path / "reference"
    args = ["aggregate", "--global", str(gdir), "--out", str(reference), "--strategy", "nesterov", *_updates(goods)]
    assert CliRunner().invoke(cli, args).exit_code == 0
    assert (out / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()


def test_settings_that_make_the_model_infinite_fail_naming_the_tensor(world, tmp_path):
    _root, gdir, goods, _ = world
    out = tmp_path / "next"
    args = ["aggregate", "--global", str(gdir), "--out", str(out), "--strategy", "fedavgm", "--server-lr", "1e40"]
    result = CliRunner().invoke(cli, [*args, *_updates(goods)])
    assert result.exit_code == 2
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "would not be finite with strategy fedavgm" in errors[0] and "layer." in errors[0]
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--server-lr", "nan"], "--server-lr must be a finite number"),
        (["--server-lr", "inf"], "--server-lr must be a finite number"),
        (["--server-lr", "-1"], "--server-lr must be positive"),
        (["--tau", "nan"], "--tau must be a finite number"),
        (["--momentum", "1.5"], "--momentum must be in [0, 1)"),
        (["--betas", "nan,0.9"], "--betas must be a finite number"),
        (["--betas", "0.9"], "--betas must be two comma-separated numbers"),
        (["--trim", "0.7"], "--trim must be in [0, 0.5)"),
        (["--norm-clip", "-2"], "--norm-clip must be positive"),
        (["--min-updates", str(2**40)], "--min-updates must fit in CWL's 32-bit int"),
        (["--chunk-mb", "nan"], "--chunk-mb must be between"),
        (["--chunk-mb", "0"], "--chunk-mb must be between"),
        (["--round", "-1"], "--round must be 0 or more"),
        (["--max-weight", "lumi=nan"], "--max-weight 'lumi=nan': give NAME=NUMBER"),
        (["--weight", "lumi"], "--weight 'lumi': give NAME=NUMBER"),
        (["--update", "a b=/tmp"], "give NAME=DIR"),
    ],
)
def test_hostile_options_are_refused_before_reading(world, tmp_path, args, message):
    _root, gdir, goods, _ = world
    result = CliRunner().invoke(
        cli, ["aggregate", "--global", str(gdir), "--out", str(tmp_path / "o"), *_updates(goods), *args]
    )
    assert result.exit_code == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert not (tmp_path / "o").exists()


# --- LoRA adapters ------------------------------------------------------------------------------

OUT_F, IN_F = 6, 5
MODULE = "model.layers.0.self_attn.q_proj"


def _lora_config(**changes) -> dict:
    return {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "lora_dropout": 0.0} | changes


def _lora_tensors(seed: int, r: int = 2, scale: float = 0.1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    prefix = f"base_model.model.{MODULE}"
    return {
        f"{prefix}.lora_A.weight": torch.randn(r, IN_F, generator=g) * scale,
        f"{prefix}.lora_B.weight": torch.randn(OUT_F, r, generator=g) * scale,
    }


@pytest.fixture(scope="module")
def lora_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile-lora")
    gdir = write_global(
        root / "global", {f"{MODULE}.weight": torch.ones(OUT_F, IN_F), "model.norm.weight": torch.ones(OUT_F)}
    )
    fp = fingerprint(gdir)
    goods = [
        write_update(root / "good" / name, name, _lora_tensors(i), fp, mode="lora", adapter_config=_lora_config())
        for i, name in enumerate(("leonardo", "lumi"))
    ]
    refs = {}
    for merge in ("exact", "fedit"):
        out = root / f"reference-{merge}"
        result = CliRunner().invoke(
            cli, ["aggregate", "--global", str(gdir), "--out", str(out), "--lora-merge", merge, *_updates(goods)]
        )
        assert result.exit_code == 0, result.stderr
        refs[merge] = out
    return gdir, goods, refs


LORA_CASES = {
    "rank 0": (dict(tensors=_lora_tensors(5, r=0), config=_lora_config(r=0)), "r must be a positive integer"),
    "rank above the matrix": (
        dict(tensors=_lora_tensors(5, r=6), config=_lora_config(r=6)),
        "more than 'model.layers.0.self_attn.q_proj.weight' can have (5)",
    ),
    "rank unlike its config": (
        dict(tensors=_lora_tensors(5, r=3), config=_lora_config()),
        "adapter_config.json says r=2",
    ),
    "alpha not a number": (dict(config=_lora_config(lora_alpha="4")), "lora_alpha must be a finite number"),
    "alpha NaN": (dict(config_text='{"peft_type": "LORA", "r": 2, "lora_alpha": NaN}'), "NaN is not JSON"),
    "alpha negative": (dict(config=_lora_config(lora_alpha=-4)), "lora_alpha must be in (0, 1e6]"),
    "alpha absurd": (dict(config=_lora_config(lora_alpha=1e30)), "lora_alpha must be in (0, 1e6]"),
    "not LoRA": (dict(config=_lora_config(peft_type="IA3")), "peft_type must be LORA"),
    "DoRA": (dict(config=_lora_config(use_dora=True)), "DoRA (use_dora) cannot be merged"),
    "rank pattern": (dict(config=_lora_config(rank_pattern={"q_proj": 4})), "rank_pattern"),
    "config not an object": (dict(config_text="[]"), "must be a JSON object"),
    "config is huge": (dict(config_text=" " * 100_000 + "{}"), "more than the 65536 bytes"),
    "huge factors overflow": (dict(tensors=_lora_tensors(5, scale=1e30)), "overflows"),
    "stray tensor": (dict(tensors=_lora_tensors(5) | {"lm_head.weight": torch.zeros(2)}), "is not a LoRA A/B matrix"),
}


@pytest.mark.parametrize("merge", ["exact", "fedit"])
@pytest.mark.parametrize("case", sorted(LORA_CASES))
def test_hostile_adapter_is_left_out(lora_world, tmp_path, case, merge, caplog):
    gdir, goods, refs = lora_world
    spec, expected = LORA_CASES[case]
    vega = write_update(
        tmp_path / "vega", "vega", spec.get("tensors", _lora_tensors(7)), fingerprint(gdir), mode="lora",
        adapter_config=spec.get("config", _lora_config()),
    )  # fmt: skip
    if "config_text" in spec:
        (vega / "adapter_config.json").write_text(spec["config_text"])
    out = tmp_path / "next"
    args = ["aggregate", "--global", str(gdir), "--out", str(out), "--lora-merge", merge, *_updates([*goods, vega])]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.stderr
    complaints = _complaints(caplog)
    assert len(complaints) == 1 and "'vega'" in complaints[0] and expected in complaints[0], complaints
    for rel in ("model.safetensors", "adapter/adapter_model.safetensors"):
        if (refs[merge] / rel).exists():
            assert (out / rel).read_bytes() == (refs[merge] / rel).read_bytes(), rel


def test_fedit_writes_its_own_adapter_config_and_refuses_unequal_adapters(lora_world, tmp_path):
    gdir, goods, refs = lora_world
    written = json.loads((refs["fedit"] / "adapter" / "adapter_config.json").read_text())
    assert written["r"] == 2 and written["lora_alpha"] == 4 and written["peft_type"] == "LORA"
    assert "use_dora" in written and written.get("base_model_name_or_path") is None
    # a client's extra keys never reach the global adapter
    sly = write_update(
        tmp_path / "vega", "vega", _lora_tensors(9), fingerprint(gdir), mode="lora",
        adapter_config=_lora_config(lora_alpha=8, auto_mapping={"evil": "x"}),
    )  # fmt: skip
    out = tmp_path / "next"
    result = CliRunner().invoke(
        cli, ["aggregate", "--global", str(gdir), "--out", str(out), "--lora-merge", "fedit", *_updates([sly, *goods])]
    )
    assert result.exit_code == 0, result.stderr
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert "auto_mapping" not in config and config["lora_alpha"] == 8
    record = json.loads((out / "aggregate.json").read_text())
    assert sorted(r["facility"] for r in record["rejected"]) == ["leonardo", "lumi"]
    assert "differ from the first valid adapter's" in record["rejected"][0]["reason"]


# --- memory: a hostile update costs no more than its bounded header ------------------------------


def test_hostile_updates_do_not_grow_memory(world, tmp_path):
    """A 39 MB header, a deeply nested one and a 1 MB update.json, merged beside the good ones, in a fresh process."""
    _root, gdir, goods, _ = world
    hostile = [
        _hostile(tmp_path / name, gdir, CASES[name][0])
        for name in ("39 MB header", "deeply nested header", "update.json is huge")
    ]
    code = (
        "import resource, sys\n"
        "from xffl_cwl.cli import main\n"
        "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, code)\n"
    )

    def peak(*updates: Path) -> int:
        out = tmp_path / f"out-{len(updates)}"
        args = ["aggregate", "--global", str(gdir), "--out", str(out), *_updates(updates)]
        proc = subprocess.run(
            [sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=REPO, timeout=300
        )
        kib, exit_code = proc.stdout.split()[-2:]
        assert exit_code in ("0", "None"), proc.stderr
        return int(kib)

    alone = peak(*goods)
    mixed = peak(*goods, *hostile)
    assert mixed - alone < 20 * 1024, f"hostile updates added {(mixed - alone) / 1024:.0f} MB"
