"""federation.yml: typed objects from a good file, one line naming the key for every mistake."""

from __future__ import annotations

import textwrap

import pytest

from conftest import run_cli
from xffl_cwl.errors import InputError
from xffl_cwl.federation import load_federation

GOOD = """\
name: demo
rounds: 2
model: {model}
test_set: {test}
training:
  local_steps: 5
  seq_len: 64
  lora: {{r: 4}}
aggregation:
  strategy: fedadam
  betas: [0.8, 0.9]
  min_updates: 2
facilities:
  - name: leonardo
    dataset: {data}/leonardo
  - name: lumi
    dataset: {data}/lumi
    deployment: {{kind: local, workdir: elsewhere/lumi}}
    training: {{batch_size: 2, epochs: 1}}
"""


@pytest.fixture
def write(tmp_path, demo_assets):
    def _write(text: str, **extra) -> object:
        path = tmp_path / "federation.yml"
        path.write_text(
            text.format(
                model=demo_assets.model, test=demo_assets.test_set, data=demo_assets.model.parent / "data", **extra
            )
        )
        return path

    return _write


def test_good_federation_parses_into_typed_objects(write, tmp_path):
    spec = load_federation(write(GOOD))
    assert spec.name == "demo" and spec.rounds == 2
    assert spec.aggregation.strategy == "fedadam" and spec.aggregation.betas == (0.8, 0.9)
    leonardo, lumi = spec.facilities
    assert leonardo.training.local_steps == 5 and leonardo.training.lora.r == 4 and leonardo.training.batch_size == 8
    # a facility's epochs replace the federation's local_steps
    assert lumi.training.epochs == 1 and lumi.training.local_steps is None and lumi.training.seq_len == 64
    assert lumi.deployment.workdir == (tmp_path / "elsewhere" / "lumi").resolve()


MISTAKES = {
    "unknown key": (
        "  strategy: fedadam\n",
        "  strategy: fedadam\n  stratgy: x\n",
        "aggregation.stratgy: unknown key; expected one of strategy",
    ),
    "missing field": ("rounds: 2\n", "", "rounds: is required"),
    "rounds below 1": ("rounds: 2\n", "rounds: 0\n", "rounds: must be at least 1, got 0"),
    "unsafe name": (
        "  - name: lumi\n",
        "  - name: Lumi-2\n",
        "facilities[1].name: 'Lumi-2' is not a safe facility name",
    ),
    "js-unsafe name": (
        "  - name: lumi\n",
        "  - name: lumi.x\n",
        "facilities[1].name: 'lumi.x' is not a safe facility name",
    ),
    "reserved name": ("  - name: lumi\n", "  - name: aggregator\n", "facilities[1].name: 'aggregator' is reserved"),
    "duplicate": ("  - name: lumi\n", "  - name: leonardo\n", "facilities[1].name: duplicate facility 'leonardo'"),
    "bad type": ("  local_steps: 5\n", "  local_steps: five\n", "training.local_steps: must be an integer, got 'five'"),
    "both steps and epochs": (
        "  local_steps: 5\n",
        "  local_steps: 5\n  epochs: 2\n",
        "training: give local_steps or epochs, not both",
    ),
    "bad strategy": ("  strategy: fedadam\n", "  strategy: fedprox\n", "aggregation.strategy: must be one of fedavg"),
    "missing dataset": ("    dataset: {data}/leonardo\n", "    dataset: nowhere\n", "facilities[0].dataset:"),
    "min_updates too high": (
        "  min_updates: 2\n",
        "  min_updates: 3\n",
        "aggregation.min_updates: is 3 but there are only 2 facilities",
    ),
    "bad federation name": ("name: demo\n", "name: My Demo\n", "name: 'My Demo' is not a safe name"),
    "unknown deployment kind": (
        "kind: local, workdir",
        "kind: kubernetes, workdir",
        "facilities[1].deployment.kind: must be one of",
    ),
    "bad lora key": ("  lora: {{r: 4}}\n", "  lora: {{rank: 4}}\n", "training.lora.rank: unknown key"),
}


@pytest.mark.parametrize("case", sorted(MISTAKES))
def test_every_mistake_is_one_line_naming_the_key(write, tmp_path, case):
    old, new, message = MISTAKES[case]
    assert old in GOOD
    path = write(GOOD.replace(old, new))
    with pytest.raises(InputError) as info:
        load_federation(path)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert str(info.value).startswith("federation.yml: ")
    proc = run_cli("generate", path, "-o", tmp_path / "run")
    assert proc.returncode == 2
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_yaml_errors_and_missing_files(tmp_path):
    bad = tmp_path / "federation.yml"
    bad.write_text("name: [unclosed\n")
    proc = run_cli("generate", bad, "-o", tmp_path / "run")
    assert proc.returncode == 2 and "is not valid YAML" in proc.stderr
    dup = tmp_path / "dup.yml"
    dup.write_text(textwrap.dedent("name: a\nname: b\n"))
    proc = run_cli("generate", dup, "-o", tmp_path / "run")
    assert proc.returncode == 2 and "dup.yml" in proc.stderr
    proc = run_cli("generate", tmp_path / "absent.yml", "-o", tmp_path / "run")
    assert proc.returncode == 2 and "absent.yml" in proc.stderr
    assert not (tmp_path / "run").exists()


FAULT_TOLERANCE = """\
round_deadline: "02:00:00"
recovery: {{retries: 4, retry_delay: 30}}
"""


def test_deadlines_recovery_and_weights_reach_the_generated_files(write, tmp_path):
    from ruamel.yaml import YAML

    from xffl_cwl.generator import generate

    text = GOOD.replace("facilities:\n", FAULT_TOLERANCE + "facilities:\n")
    text = text.replace(
        "    dataset: {data}/lumi\n", "    dataset: {data}/lumi\n    round_deadline: 1-00:00:00\n    weight: 1\n"
    )
    text = text.replace("    dataset: {data}/leonardo\n", "    dataset: {data}/leonardo\n    weight: 3\n")
    spec = load_federation(write(text))
    leonardo, lumi = spec.facilities
    assert spec.round_deadline == 7200 and leonardo.deadline == 7200 and lumi.deadline == 86400
    assert spec.recovery.retries == 4 and spec.recovery.retry_delay == 30
    generate(spec, tmp_path / "run")
    yaml = YAML(typ="safe")
    steps = yaml.load((tmp_path / "run" / "round.cwl").read_text())["steps"]
    assert steps["train_leonardo"]["in"]["deadline"] == {"default": 7200}
    assert steps["train_lumi"]["in"]["deadline"] == {"default": 86400}
    assert "$(present(inputs.left_out" in steps["train_lumi"]["when"]
    assert steps["aggregate"]["in"]["statuses"]["pickValue"] == "all_non_null"
    assert steps["aggregate"]["in"]["weights"] == {"default": ["leonardo=3", "lumi=1"]}
    config = yaml.load((tmp_path / "run" / "streamflow.yml").read_text())
    assert config["failureManager"] == {
        "enabled": True,
        "type": "default",
        "config": {"max_retries": 4, "retry_delay": 30},
    }


@pytest.mark.parametrize(
    "old, new, message",
    [
        ("rounds: 2\n", 'rounds: 2\nround_deadline: "1:xx"\n', "round_deadline: must be an integer"),
        ("rounds: 2\n", "rounds: 2\nround_deadline: 0\n", "round_deadline: must be at least 1"),
        ("rounds: 2\n", "rounds: 2\nrecovery: {{retries: -1}}\n", "recovery.retries: must be at least 0"),
        ("rounds: 2\n", "rounds: 2\nrecovery: {{retry: 3}}\n", "recovery.retry: unknown key"),
        (
            "    dataset: {data}/lumi\n",
            "    dataset: {data}/lumi\n    round_deadline: soon\n",
            "facilities[1].round_deadline: must be an integer",
        ),
    ],
)
def test_fault_tolerance_mistakes_are_one_line(write, old, new, message):
    with pytest.raises(InputError) as info:
        load_federation(write(GOOD.replace(old, new)))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_workers_and_sharding_reach_the_train_steps_and_the_weight_caps(write, tmp_path):
    """A facility's world (local `workers`, or a SLURM preset's nodes x GPUs) is passed to its train
    step, its sharding settings too, and its weight cap counts the global batch of all its workers."""
    from ruamel.yaml import YAML

    from xffl_cwl.generator import generate

    text = GOOD.replace(
        "    deployment: {{kind: local, workdir: elsewhere/lumi}}\n    training: {{batch_size: 2, epochs: 1}}\n",
        "    deployment: {{kind: local, workers: 2}}\n"
        "    training: {{batch_size: 2, sharding: hybrid, activation_checkpointing: true, backend: gloo}}\n",
    )
    text += (
        "  - name: karolina\n    dataset: /scratch/data\n    deployment:\n      kind: slurm\n"
        "      host: login.karolina.it4i.cz\n      username: me\n      template: leonardo\n      workdir: /scratch/me\n"
        "      sbatch: {{account: A, nodes: 2, gpus_per_node: 4}}\n      container: {{image: /scratch/me/client.sif}}\n"
    )
    spec = load_federation(write(text.replace("min_updates: 2", "min_updates: 3")))
    generate(spec, tmp_path / "run")
    steps = YAML(typ="safe").load((tmp_path / "run" / "round.cwl").read_text())["steps"]
    assert "nnodes" not in steps["train_leonardo"]["in"] and "nproc_per_node" not in steps["train_leonardo"]["in"]
    lumi, karolina = steps["train_lumi"]["in"], steps["train_karolina"]["in"]
    assert lumi["nproc_per_node"] == {"default": 2} and "nnodes" not in lumi
    assert lumi["sharding"] == {"default": "hybrid"} and lumi["activation_checkpointing"] == {"default": True}
    assert lumi["backend"] == {"default": "gloo"}
    assert karolina["nnodes"] == {"default": 2} and karolina["nproc_per_node"] == {"default": 4}  # 8 workers
    # local_steps x batch_size x workers x grad_accum
    assert steps["aggregate"]["in"]["max_weights"] == {"default": ["leonardo=40", "lumi=20", "karolina=320"]}
    script = (tmp_path / "run" / "tools" / "train.cwl").read_text()
    assert "--nproc-per-node" in script and "--sharding" in script


@pytest.mark.parametrize(
    "old, new, message",
    [
        ("kind: local, workdir: elsewhere/lumi", "kind: local, workers: 0", "deployment.workers: must be at least 1"),
        ("epochs: 1}}", "epochs: 1, sharding: zero3}}", "training.sharding: must be one of auto, full, hybrid"),
        ("epochs: 1}}", "epochs: 1, activation_checkpointing: 1}}", "activation_checkpointing: must be true or false"),
    ],
)
def test_world_and_sharding_mistakes_are_one_line(write, old, new, message):
    with pytest.raises(InputError) as err:
        load_federation(write(GOOD.replace(old, new)))
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


@pytest.mark.parametrize(
    "container, message",
    [
        ("", "deployment.container.image: jobs run in singularity (template leonardo) but no image is set"),
        ("      container: {{runtime: podman}}\n", "jobs run in podman (template leonardo) but no image is set; give the image (its name"),
        ("      container: {{runtime: docker, image: x}}\n", "deployment.container.runtime: must be one of apptainer, singularity, podman, none"),
    ],
    ids=["preset runtime, no image", "podman, no image", "unknown runtime"],
)  # fmt: skip
def test_a_container_without_an_image_is_one_line_at_generate(write, container, message):
    text = GOOD + (
        "  - name: karolina\n    dataset: /scratch/data\n    deployment:\n      kind: slurm\n"
        "      host: login.karolina.it4i.cz\n      username: me\n      template: leonardo\n      workdir: /scratch/me\n"
        + container
    )
    with pytest.raises(InputError) as err:
        load_federation(write(text))
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)
