"""A person adds a facility to a generated run folder by hand, exactly as the README says, and runs it."""

from __future__ import annotations

import copy
import json

import pytest
from ruamel.yaml import YAML

from conftest import run_cli, write_federation
from xffl_cwl.federation import load_federation
from xffl_cwl.generator import generate

yaml = YAML()  # round-trip: comments and layout survive, as in a text editor
yaml.indent(mapping=2, sequence=4, offset=2)


def _edit(path, change) -> None:
    document = yaml.load(path.read_text())
    change(document)
    with open(path, "w") as fh:
        yaml.dump(document, fh)


@pytest.fixture(scope="module")
def edited_run(tmp_path_factory, demo_assets):
    """A generated 2-facility run folder with a third facility added by hand, run for one round."""
    tmp_path = tmp_path_factory.mktemp("hand-edit")
    spec = load_federation(
        write_federation(
            tmp_path / "federation.yml", demo_assets, ["leonardo", "lumi"], rounds=1, steps=2, strategy="fedavgm"
        )
    )
    run = tmp_path / "run"
    generate(spec, run)
    new = "meluxina"

    def round_cwl(doc):
        # 1. copy a train_<facility> block, rename it, point it at the new dataset
        block = copy.deepcopy(doc["steps"]["train_lumi"])
        block["label"] = f"Local training at {new}"
        block["in"]["dataset"] = f"dataset_{new}"
        block["in"]["facility"]["default"] = new
        block["in"]["model"]["source"][0] = f"local_{new}"
        doc["steps"].insert(2, f"train_{new}", block)
        # 2. declare its dataset input, and its copy of the model, which the loop carries
        doc["inputs"][f"dataset_{new}"] = copy.deepcopy(doc["inputs"]["dataset_lumi"])
        doc["inputs"][f"local_{new}"] = copy.deepcopy(doc["inputs"]["local_lumi"])
        doc["outputs"][f"new_local_{new}"] = {"type": "Directory?", "outputSource": f"train_{new}/local_model"}
        # 3. add its update and its status record to the aggregator's sources
        doc["steps"]["aggregate"]["in"]["updates"]["source"].append(f"train_{new}/update")
        doc["steps"]["aggregate"]["in"]["statuses"]["source"].append(f"train_{new}/status")

    def main_cwl(doc):
        # 4. declare the dataset in main.cwl and pass it to the loop
        doc["inputs"][f"dataset_{new}"] = copy.deepcopy(doc["inputs"]["dataset_lumi"])
        doc["steps"]["federation"]["in"][f"dataset_{new}"] = f"dataset_{new}"
        doc["steps"]["federation"]["in"][f"local_{new}"] = {"valueFrom": "$(null)"}
        doc["steps"]["federation"]["out"].append(f"new_local_{new}")
        doc["steps"]["federation"]["requirements"]["cwltool:Loop"]["loop"][f"local_{new}"] = f"new_local_{new}"

    def inputs_yml(doc):
        # 5. say where the data is
        doc[f"dataset_{new}"] = {"class": "Directory", "path": str(demo_assets.datasets[new])}

    def streamflow_yml(doc):
        # 6. a deployment for the facility and a binding for its step
        doc["deployments"][new] = {"type": "local", "config": {}, "workdir": f"work/{new}"}
        doc["workflows"]["test"]["bindings"].append({"step": f"/federation/train_{new}", "target": {"deployment": new}})

    _edit(run / "round.cwl", round_cwl)
    _edit(run / "main.cwl", main_cwl)
    _edit(run / "inputs.yml", inputs_yml)
    _edit(run / "streamflow.yml", streamflow_yml)

    validated = run_cli("validate", run)
    ran = run_cli("run", run, timeout=600)
    return run, new, validated, ran


def test_add_a_third_facility_by_hand(edited_run):
    run, new, validated, proc = edited_run
    assert validated.returncode == 0, validated.stderr
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "training started at meluxina" in proc.stderr
    history = [json.loads(line) for line in (run / "out" / "history.jsonl").read_text().splitlines()]
    assert set(history[-1]["facilities"]) == {"leonardo", "lumi", new}
    assert list((run / "work" / new).glob(f"*/{new}/update.json"))
