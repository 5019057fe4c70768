"""The client trainer on the tiny demo model: it learns, and writes updates the aggregator and PEFT accept."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

from conftest import run_aggregate, run_train
from xffl_cwl.cli import cli
from xffl_cwl.learning.model_dir import fingerprint
from xffl_cwl.learning.safetensors_stream import read_checkpoint

FAST = {"seq_len": 64, "batch_size": 8, "lr": 3e-3, "progress": False}


def test_full_training_lowers_heldout_loss_and_keeps_layout(demo_assets, tmp_path):
    out = tmp_path / "update"
    record = run_train(
        model=demo_assets.model,
        dataset=demo_assets.datasets["leonardo"],
        out=out,
        facility="leonardo",
        local_steps=25,
        **FAST,
    )
    assert record["eval_loss"]["after"] < record["eval_loss"]["before"] - 0.5
    assert record["train_loss"]["last"] < record["train_loss"]["first"]
    assert record["base_fingerprint"] == fingerprint(demo_assets.model)
    assert record["steps"] == 25 and record["samples"] > 0 and record["tokens"] == 25 * 8 * 64
    assert record["bytes_written"] > 0 and record["tokens_per_second"] > 0
    on_disk = json.loads((out / "update.json").read_text())
    assert on_disk == record
    glob, mine = read_checkpoint(demo_assets.model), read_checkpoint(out)
    assert [(e.name, e.dtype, e.shape) for e in glob.entries()] == [(e.name, e.dtype, e.shape) for e in mine.entries()]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert model.config.model_type == "llama"


def test_lora_training_writes_an_adapter_peft_loads(demo_assets, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "adapter"
    record = run_train(
        model=demo_assets.model,
        dataset=demo_assets.datasets["lumi"],
        out=out,
        facility="lumi",
        local_steps=15,
        mode="lora",
        lora_r=4,
        lora_targets=("q_proj", "v_proj", "o_proj"),
        **FAST,
    )
    assert record["mode"] == "lora" and record["lora"]["r"] == 4
    assert record["eval_loss"]["after"] < record["eval_loss"]["before"]
    assert {p.name for p in out.iterdir()} == {"adapter_config.json", "adapter_model.safetensors", "update.json"}
    base = AutoModelForCausalLM.from_pretrained(demo_assets.model, local_files_only=True)
    model = PeftModel.from_pretrained(base, out)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert len(lora_b) == 2 * 3 and any(float(p.abs().sum()) > 0 for p in lora_b)


def test_every_facility_starts_from_the_same_fresh_adapter(demo_assets, tmp_path):
    from safetensors.torch import load_file

    a = run_train(
        model=demo_assets.model,
        dataset=demo_assets.datasets["lumi"],
        out=tmp_path / "a",
        facility="lumi",
        local_steps=1,
        mode="lora",
        lr=1e-12,
        seq_len=64,
        progress=False,
    )
    b = run_train(
        model=demo_assets.model,
        dataset=demo_assets.datasets["meluxina"],
        out=tmp_path / "b",
        facility="meluxina",
        local_steps=1,
        mode="lora",
        lr=1e-12,
        seq_len=64,
        seed=5,
        progress=False,
    )
    ta, tb = (
        load_file(str(tmp_path / "a" / "adapter_model.safetensors")),
        load_file(str(tmp_path / "b" / "adapter_model.safetensors")),
    )
    for name in ta:
        if "lora_A" in name:
            torch.testing.assert_close(ta[name], tb[name], rtol=0, atol=1e-8)
    assert a["facility"] != b["facility"]


def test_bf16_and_epochs(demo_assets, tmp_path):
    record = run_train(
        model=demo_assets.model,
        dataset=demo_assets.datasets["meluxina"],
        out=tmp_path / "u",
        facility="meluxina",
        epochs=0.05,
        precision="bf16",
        **FAST,
    )
    assert record["hyperparameters"]["precision"] == "bf16"
    assert record["steps"] == math.ceil(0.05 * record["samples"] / 8)
    # the weights keep the global model's dtype whatever the training precision
    assert {e.dtype for e in read_checkpoint(tmp_path / "u").entries()} == {"F32"}


def test_sharded_global_gives_sharded_update(demo_assets, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(demo_assets.model, local_files_only=True).save_pretrained(
        sharded, max_shard_size="150KB"
    )
    AutoTokenizer.from_pretrained(demo_assets.model, local_files_only=True).save_pretrained(sharded)
    assert (sharded / "model.safetensors.index.json").is_file()
    run_train(
        model=sharded,
        dataset=demo_assets.datasets["leonardo"],
        out=tmp_path / "u",
        facility="leonardo",
        local_steps=2,
        **FAST,
    )
    assert read_checkpoint(tmp_path / "u").relpaths == read_checkpoint(sharded).relpaths

    result = run_aggregate(global_dir=sharded, updates=[tmp_path / "u"], out=tmp_path / "g1")
    assert read_checkpoint(tmp_path / "g1").relpaths == read_checkpoint(sharded).relpaths
    AutoModelForCausalLM.from_pretrained(tmp_path / "g1", local_files_only=True)
    assert result["samples"] > 0


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--local-steps", "2", "--epochs", "1"], "give either --local-steps or --epochs, not both"),
        (["--local-steps", "0"], "--local-steps must be at least 1"),
        (["--seq-len", "100000"], "yields no training sequence of --seq-len 100000 tokens"),
        (["--lr", "0"], "--lr must be positive"),
        (["--lora-targets", " , "], "--lora-targets must name at least one module"),
        (["--mode", "lora", "--lora-targets", "no_such_proj"], "--lora-targets no_such_proj"),
    ],
)
def test_bad_training_input_exits_2_and_writes_nothing(demo_assets, tmp_path, extra, message):
    out = tmp_path / "u"
    result = CliRunner().invoke(
        cli,
        [
            "train",
            "--model",
            str(demo_assets.model),
            "--dataset",
            str(demo_assets.datasets["lumi"]),
            "--out",
            str(out),
            "--facility",
            "lumi",
            "--no-progress",
            *extra,
        ],
    )
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert len([line for line in result.stderr.splitlines() if "error:" in line]) == 1
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".u.")]


def test_missing_inputs_are_named(demo_assets, tmp_path):
    runner = CliRunner()
    result = runner.invoke(
        cli,
        [
            "train",
            "--model",
            str(tmp_path / "nope"),
            "--dataset",
            str(demo_assets.datasets["lumi"]),
            "--out",
            str(tmp_path / "u"),
            "--facility",
            "x",
        ],
    )
    assert result.exit_code == 2 and "--model" in result.stderr and "nope" in result.stderr
    result = runner.invoke(
        cli,
        [
            "train",
            "--model",
            str(demo_assets.model),
            "--dataset",
            str(tmp_path / "nodata"),
            "--out",
            str(tmp_path / "u"),
            "--facility",
            "x",
        ],
    )
    assert result.exit_code == 2 and "dataset" in result.stderr and "nodata" in result.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json}\n')
    result = runner.invoke(
        cli,
        [
            "train",
            "--model",
            str(demo_assets.model),
            "--dataset",
            str(bad),
            "--out",
            str(tmp_path / "u"),
            "--facility",
            "x",
        ],
    )
    assert result.exit_code == 2 and "bad.jsonl:2 is not valid JSON" in result.stderr
    assert not (tmp_path / "u").exists()
