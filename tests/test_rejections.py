"""Every way an update or an aggregation can be refused: one line naming the culprit, exit 2, no --out."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

from conftest import run_cli, write_global, write_update
from xffl_cwl.cli import cli
from xffl_cwl.learning.model_dir import fingerprint


def _base() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"layer.weight": torch.randn(4, 3, generator=g), "layer.bias": torch.randn(4, generator=g)}


@pytest.fixture
def world(tmp_path):
    gdir = write_global(tmp_path / "global", _base())
    good = write_update(tmp_path / "leonardo", "leonardo", {k: v + 0.1 for k, v in _base().items()}, fingerprint(gdir))
    return tmp_path, gdir, good


def _invoke(*args) -> tuple[int, str]:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.stderr


def _bad_update(tmp_path, gdir, name="lumi", **changes) -> object:
    tensors = {k: v + 0.2 for k, v in _base().items()}
    tensors.update(changes.pop("tensors", {}))
    for drop in changes.pop("drop", []):
        tensors.pop(drop)
    fp = changes.pop("fp", fingerprint(gdir))
    return write_update(tmp_path / "bad" / name, name, tensors, fp, **changes)


CASES = {
    "wrong shape": (
        {"tensors": {"layer.weight": torch.zeros(3, 4)}},
        "tensor 'layer.weight' has shape [3, 4], the global model has [4, 3]",
    ),
    "wrong dtype": (
        {"tensors": {"layer.bias": torch.zeros(4, dtype=torch.bfloat16)}},
        "tensor 'layer.bias' has dtype BF16, the global model has F32",
    ),
    "missing tensor": ({"drop": ["layer.bias"]}, "tensor 'layer.bias' of the global model is missing"),
    "extra tensor": ({"tensors": {"layer.extra": torch.zeros(2)}}, "tensor 'layer.extra' is not in the global model"),
    "nan": (
        {"tensors": {"layer.weight": torch.full((4, 3), math.nan)}},
        "tensor 'layer.weight' holds NaN or Inf values",
    ),
    "inf": (
        {"tensors": {"layer.bias": torch.tensor([0.0, math.inf, 0.0, 0.0])}},
        "tensor 'layer.bias' holds NaN or Inf values",
    ),
    "foreign base": ({"fp": "sha256:" + "0" * 64}, "it was trained from a different global model"),
    "stale round": ({"round_number": 7}, "it is for round 7, this aggregation is for round 1"),
    "zero samples": ({"samples": 0}, "it reports 0 training samples"),
    "wrong kind": ({"mode": "lora", "tensors": {}}, None),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_update_is_rejected_with_facility_and_tensor(world, case):
    tmp_path, gdir, good = world
    changes, expected = CASES[case]
    if case == "wrong kind":
        bad = write_update(
            tmp_path / "bad" / "lumi",
            "lumi",
            {
                "base_model.model.layer.lora_A.weight": torch.zeros(2, 3),
                "base_model.model.layer.lora_B.weight": torch.zeros(4, 2),
            },
            fingerprint(gdir),
            mode="lora",
            adapter_config={"peft_type": "LORA", "r": 2, "lora_alpha": 4},
        )
        expected = "it is a lora update, the others are full"
    else:
        bad = _bad_update(tmp_path, gdir, **changes)
    out = tmp_path / "next"
    code, err = _invoke(
        "aggregate", "--global", gdir, "--update", good, "--update", bad, "--out", out, "--min-updates", 2
    )
    assert code == 2
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    assert "only 1 valid update(s) of 2, --min-updates is 2" in lines[0]
    assert f"lumi: {expected}" in lines[0]
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".next")] == []
    # with --min-updates 1 the good update is used and the bad one reported
    code, _ = _invoke("aggregate", "--global", gdir, "--update", good, "--update", bad, "--out", out)
    assert code == 0
    record = json.loads((out / "aggregate.json").read_text())
    assert list(record["facilities"]) == ["leonardo"]
    assert record["rejected"][0]["facility"] == "lumi" and expected in record["rejected"][0]["reason"]


def test_duplicate_facility(world):
    tmp_path, gdir, good = world
    twin = _bad_update(tmp_path, gdir, name="leonardo")
    code, err = _invoke(
        "aggregate", "--global", gdir, "--update", good, "--update", twin, "--out", tmp_path / "o", "--min-updates", 2
    )
    assert code == 2 and "leonardo: a second update from the same facility" in err
    assert not (tmp_path / "o").exists()


def test_missing_update_json_and_corrupt_weights(world):
    tmp_path, gdir, _good = world
    empty = tmp_path / "empty-update"
    empty.mkdir()
    corrupt = _bad_update(tmp_path, gdir, name="vega")
    (corrupt / "model.safetensors").write_bytes(b"garbage!" * 3)
    code, err = _invoke("aggregate", "--global", gdir, "--update", empty, "--update", corrupt, "--out", tmp_path / "o")
    assert code == 2
    assert "only 0 valid update(s) of 2" in err
    assert "empty-update: " in err and "update.json is missing" in err
    assert "vega: " in err and "is not a safetensors file" in err
    assert not (tmp_path / "o").exists()


def test_truncated_update_is_rejected(world):
    tmp_path, gdir, _good = world
    bad = _bad_update(tmp_path, gdir, name="karolina")
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    code, err = _invoke("aggregate", "--global", gdir, "--update", bad, "--out", tmp_path / "o")
    assert code == 2 and "karolina: " in err and "data_offsets cover 64 bytes of data but the file holds 56" in err
    assert not (tmp_path / "o").exists()


def test_bad_options_are_refused_before_reading(world):
    tmp_path, gdir, good = world
    cases = [
        (["--update", good, "--out", tmp_path / "o", "--min-updates", 0], "--min-updates must be at least 1"),
        (["--out", tmp_path / "o"], "no --update given"),
        (["--update", good, "--out", tmp_path / "o", "--betas", "0.9"], "--betas must be two comma-separated numbers"),
        (
            ["--update", good, "--out", tmp_path / "o", "--strategy", "fedadam", "--server-lr", "-1"],
            "--server-lr must be positive",
        ),
        (["--update", good, "--out", tmp_path / "o", "--state", tmp_path / "nope"], "keeps no state"),
        (["--update", good, "--out", tmp_path / "o", "--strategy", "fedadam", "--state", tmp_path / "nope"], "--state"),
        (["--update", good, "--out", good], "already exists and is not empty"),
    ]
    for args, message in cases:
        code, err = _invoke("aggregate", "--global", gdir, *args)
        assert code == 2, (args, err)
        assert message in err, (args, err)
        assert not (tmp_path / "o").exists()
    code, err = _invoke("aggregate", "--global", tmp_path / "missing", "--update", good, "--out", tmp_path / "o")
    assert code == 2 and "--global" in err and "is not a directory" in err


def test_real_binary_exits_2_with_one_line(world):
    tmp_path, gdir, _good = world
    bad = _bad_update(tmp_path, gdir, tensors={"layer.weight": torch.full((4, 3), math.nan)})
    proc = run_cli("aggregate", "--global", gdir, "--update", bad, "--out", tmp_path / "o")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("xffl-cwl aggregate: error: only 0 valid update(s) of 1")
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()
