"""The generator: valid, deterministic, readable CWL; `xffl-cwl validate` catches what StreamFlow only warns about."""

from __future__ import annotations

import subprocess
import sys

from ruamel.yaml import YAML

from conftest import run_cli, write_federation
from xffl_cwl.federation import load_federation
from xffl_cwl.generator import GENERATED_FILES, generate

yaml = YAML()


def _generate(tmp_path, demo_assets, name="run", **kwargs):
    spec = load_federation(
        write_federation(tmp_path / f"{name}.yml", demo_assets, ["leonardo", "lumi", "meluxina"], **kwargs)
    )
    generate(spec, tmp_path / name)
    return tmp_path / name


def test_generated_workflow_passes_cwltool_validation(tmp_path, demo_assets):
    run = _generate(tmp_path, demo_assets)
    proc = subprocess.run(
        [sys.executable, "-m", "cwltool", "--validate", "--enable-ext", str(run / "main.cwl")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "is valid CWL" in proc.stdout + proc.stderr
    round_cwl = yaml.load((run / "round.cwl").read_text())
    assert list(round_cwl["steps"]) == ["train_leonardo", "train_lumi", "train_meluxina", "aggregate", "evaluate"]
    assert list(round_cwl["steps"]["aggregate"]["in"]["updates"]["source"]) == [
        f"train_{f}/update" for f in ("leonardo", "lumi", "meluxina")
    ]
    assert round_cwl["steps"]["aggregate"]["in"]["updates"]["linkMerge"] == "merge_flattened"
    main = yaml.load((run / "main.cwl").read_text())
    loop = main["steps"]["federation"]["requirements"]["cwltool:Loop"]
    assert (
        loop["outputMethod"] == "last" and loop["loop"]["model"] == "new_model" and loop["loop"]["state"] == "new_state"
    )


def test_generation_is_deterministic(tmp_path, demo_assets):
    a = _generate(tmp_path, demo_assets, "a")
    spec = load_federation(tmp_path / "a.yml")
    generate(spec, tmp_path / "b")
    for rel in GENERATED_FILES:
        assert (a / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    # regenerating in place with --force rewrites identical files
    before = {rel: (a / rel).read_bytes() for rel in GENERATED_FILES}
    proc = run_cli("generate", tmp_path / "a.yml", "-o", a, "--force", check=True)
    assert "wrote 8 files" in proc.stdout
    # the federation.yml it was made from, byte for byte: the report's and the RO-Crate's run identity
    assert (a / "federation.source.yml").read_bytes() == (tmp_path / "a.yml").read_bytes()
    assert before == {rel: (a / rel).read_bytes() for rel in GENERATED_FILES}
    proc = run_cli("generate", tmp_path / "a.yml", "-o", a)
    assert proc.returncode == 2 and "already exists and is not empty" in proc.stderr


def test_facility_settings_and_gpu_hint_reach_their_step(tmp_path, demo_assets):
    run = _generate(
        tmp_path,
        demo_assets,
        facility_extra={"lumi": "    deployment: {kind: local, gpus: 2}\n    training: {batch_size: 2, lr: 0.01}\n"},
    )
    steps = yaml.load((run / "round.cwl").read_text())["steps"]
    assert (
        steps["train_lumi"]["in"]["batch_size"]["default"] == 2 and steps["train_lumi"]["in"]["lr"]["default"] == 0.01
    )
    assert steps["train_leonardo"]["in"]["batch_size"]["default"] == 8
    assert steps["train_lumi"]["hints"]["cwltool:CUDARequirement"]["cudaDeviceCountMin"] == 2
    assert "hints" not in steps["train_leonardo"]


def test_streamflow_config_binds_every_step_inside_the_run_folder(tmp_path, demo_assets):
    run = _generate(tmp_path, demo_assets)
    config = yaml.load((run / "streamflow.yml").read_text())
    workflow = config["workflows"]["test"]
    bound = {b["step"]: b["target"]["deployment"] for b in workflow["bindings"]}
    assert bound == {
        "/baseline": "aggregator",
        "/federation/train_leonardo": "leonardo",
        "/federation/train_lumi": "lumi",
        "/federation/train_meluxina": "meluxina",
        "/federation/aggregate": "aggregator",
        "/federation/evaluate": "aggregator",
    }
    assert workflow["config"]["docker"][0]["deployment"]["type"] == "none"
    assert {d: c["workdir"] for d, c in config["deployments"].items()} == {
        n: f"work/{n}" for n in ("aggregator", "leonardo", "lumi", "meluxina")
    }
    assert not config["database"]["config"]["connection"].startswith("/")


def test_validate_fails_on_a_binding_that_names_no_step(tmp_path, demo_assets):
    run = _generate(tmp_path, demo_assets)
    proc = run_cli("validate", run, check=True)
    assert "valid" in proc.stdout
    config = (run / "streamflow.yml").read_text()
    (run / "streamflow.yml").write_text(config.replace("step: /federation/train_lumi", "step: /federation/train_lumii"))
    proc = run_cli("validate", run)
    assert proc.returncode == 2
    assert "binding /federation/train_lumii (to lumi) names no step of the workflow" in proc.stderr
    assert "step /federation/train_lumi has no binding" in proc.stderr
    (run / "streamflow.yml").write_text(config.replace("deployment: meluxina\n", "deployment: meluxinaa\n", 1))
    proc = run_cli("validate", run, "--no-runners")
    assert (
        proc.returncode == 2 and "targets deployment 'meluxinaa', which streamflow.yml does not define" in proc.stderr
    )


def test_validate_reports_what_cwltool_rejects(tmp_path, demo_assets):
    run = _generate(tmp_path, demo_assets)
    text = (run / "round.cwl").read_text()
    (run / "round.cwl").write_text(text.replace("source: [train_leonardo/update,", "source: [train_leonardo/updat,"))
    proc = run_cli("validate", run)
    assert proc.returncode == 2
    assert "round.cwl" in proc.stderr and "train_leonardo/updat" in proc.stderr
