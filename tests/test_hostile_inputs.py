"""Hostile federation.yml files and tool options: one line naming the key and what to do, exit 2,
nothing written, whatever the value (a newline, a shell substitution, an alias bomb, NaN)."""

from __future__ import annotations

import time

import pytest
from click.testing import CliRunner

from conftest import run_cli
from xffl_cwl.cli import cli

SLURM = """\
name: hostile
rounds: 2
model: {model}
facilities:
  - name: leonardo
    dataset: /data/leonardo
    deployment:
      kind: slurm
      host: login.example.org
      username: jdoe
      template: leonardo
      workdir: /scratch/jdoe/xffl
      sbatch: {{account: proj, partition: boost_usr_prod, time: "01:00:00"}}
      container: {{image: /images/client.sif}}
      setup: ["module load cuda"]
"""

# name -> (text to replace, replacement, what the one line must say)
FEDERATION_CASES = {
    "newline in partition": (
        "partition: boost_usr_prod",
        'partition: "boost\\n#SBATCH --wrap=id"',
        "sbatch.partition:",
    ),
    "space in account": ("account: proj", 'account: "proj x"', "sbatch.account:"),
    "quote in qos": ("account: proj", "account: proj, qos: 'a\"b'", "sbatch.qos:"),
    "substitution in workdir": ("workdir: /scratch/jdoe/xffl", "workdir: /scratch/$(id)/xffl", "workdir:"),
    "backtick in workdir": ("workdir: /scratch/jdoe/xffl", "workdir: /scratch/`id`/xffl", "workdir:"),
    "heredoc end in workdir": ("workdir: /scratch/jdoe/xffl", 'workdir: "/scratch/x\\nXFFL_EOF\\nid"', "workdir:"),
    "relative workdir": ("workdir: /scratch/jdoe/xffl", "workdir: scratch/xffl", "workdir:"),
    "substitution in dataset": ("dataset: /data/leonardo", "dataset: /data/$(reboot)", "facilities[0].dataset:"),
    "semicolon flag": ('time: "01:00:00"}', 'time: "01:00:00", extra: ["--exclusive; rm -rf ~"]}', "sbatch.extra[0]:"),
    "not a flag": ('time: "01:00:00"}', 'time: "01:00:00", extra: ["id"]}', "sbatch.extra:"),
    "time with words": ('time: "01:00:00"', 'time: "1 hour"', "sbatch.time:"),
    "newline in image": ("image: /images/client.sif", 'image: "/images/c.sif\\nid"', "container.image:"),
    "NUL in setup": ('setup: ["module load cuda"]', 'setup: ["module load cuda\\0"]', "setup[0]:"),
    "newline in setup": ('setup: ["module load cuda"]', 'setup: ["module load cuda\\nid"]', "setup[0]:"),
    "space in host": ("host: login.example.org", 'host: "login example"', "deployment.host:"),
    "shell in username": ("username: jdoe", 'username: "jdoe;id"', "deployment.username:"),
    "unknown runtime": (
        "container: {image: /images/client.sif}",
        "container: {runtime: docker, image: x}",
        "container.runtime:",
    ),
    "control char in name": ("name: hostile", 'name: "host\\x1bile"', "name:"),
    "rounds beyond 32 bits": ("rounds: 2", "rounds: 4294967296", "rounds: must fit in CWL's 32-bit int"),
    "rounds huge": ("rounds: 2", "rounds: " + "9" * 5000, "an integer has more than 4300 digits"),
    "rounds NaN": ("rounds: 2", "rounds: .nan", "rounds: must be an integer"),
    "lr infinite": ("rounds: 2", "rounds: 2\ntraining: {lr: .inf}", "training.lr: must be a finite number"),
    "lr NaN": ("rounds: 2", "rounds: 2\ntraining: {lr: .nan}", "training.lr: must be a finite number"),
    "negative clipping": (
        "rounds: 2",
        "rounds: 2\ntraining: {max_grad_norm: -1}",
        "training.max_grad_norm: must be positive",
    ),
    "server lr NaN": ("rounds: 2", "rounds: 2\naggregation: {server_lr: .nan}", "aggregation.server_lr:"),
    "tau infinite": ("rounds: 2", "rounds: 2\naggregation: {tau: .inf}", "aggregation.tau:"),
    "trim too high": ("rounds: 2", "rounds: 2\naggregation: {merge: trimmed_mean, trim: 0.9}", "aggregation.trim:"),
    "weight NaN": (
        "    dataset: /data/leonardo",
        "    weight: .nan\n    dataset: /data/leonardo",
        "facilities[0].weight:",
    ),
    "text field newline": ("rounds: 2", 'rounds: 2\ntraining: {text_field: "a\\nb"}', "training.text_field:"),
    "lora target shell": (
        "rounds: 2",
        'rounds: 2\ntraining: {lora: {targets: ["q_proj;id"]}}',
        "training.lora.targets:",
    ),
}


@pytest.fixture
def write(tmp_path, demo_assets):
    def _write(text: str):
        path = tmp_path / "federation.yml"
        path.write_text(text)
        return path

    return lambda old, new: _write(SLURM.format(model=demo_assets.model).replace(old, new, 1))


def test_the_unchanged_file_is_accepted(write, tmp_path):
    proc = run_cli("generate", write("x", "x"), "-o", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("case", sorted(FEDERATION_CASES))
def test_hostile_federation_value_is_one_line_and_nothing_is_written(write, tmp_path, case):
    old, new, message = FEDERATION_CASES[case]
    path = write(old, new)
    assert new in path.read_text()
    result = CliRunner().invoke(cli, ["generate", str(path), "-o", str(tmp_path / "run")])
    assert result.exit_code == 2, (result.stderr, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert len(lines[0]) < 400, "a bad value is shown by an excerpt"
    assert not (tmp_path / "run").exists()


def _bomb(key: str, model: str) -> str:
    """A 1.6 KB federation.yml: anchors that expand to 9^8 = 43 million items, and `key` refers to them."""
    levels = ["  - &a [" + ", ".join(["lol"] * 9) + "]"]
    for i in range(1, 8):
        levels.append(f"  - &{chr(97 + i)} [" + ", ".join([f"*{chr(96 + i)}"] * 9) + "]")
    values = {"name": "bomb", "rounds": "1", "model": model, "facilities": "[{name: x, dataset: y}]"} | {key: "*h"}
    return "test_set:\n" + "\n".join(levels) + "\n" + "".join(f"{k}: {v}\n" for k, v in values.items())


@pytest.mark.parametrize("key", ["name", "rounds", "model", "facilities"])
def test_yaml_alias_bomb_is_one_line_quickly(tmp_path, demo_assets, key):
    path = tmp_path / "federation.yml"
    path.write_text(_bomb(key, str(demo_assets.model)))
    assert len(path.read_bytes()) < 2048
    started = time.monotonic()
    proc = run_cli("generate", path, "-o", tmp_path / "run", timeout=60)
    assert time.monotonic() - started < 30
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-500:]
    assert "MemoryError" not in proc.stderr and len(proc.stderr) < 500
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-grad-norm", "-1"], "--max-grad-norm must be positive"),
        (["--max-grad-norm", "nan"], "--max-grad-norm must be a finite number"),
        (["--lr", "inf"], "--lr must be a finite number"),
        (["--epochs", "nan"], "--epochs must be a finite number"),
        (["--seq-len", str(2**40)], "--seq-len must fit in CWL's 32-bit int"),
        (["--eval-fraction", "1.5"], "--eval-fraction must be in [0, 1)"),
        (["--lora-dropout", "1"], "--lora-dropout must be in [0, 1)"),
        (["--weight-decay", "-0.1"], "--weight-decay must be in [0, 1)"),
        (["--lora-alpha", "0"], "--lora-alpha must be positive"),
        (["--text-field", "a\nb"], "--text-field must not hold control characters"),
        (["--round", "-3"], "--round must be 0 or more"),
    ],
)
def test_hostile_training_options_exit_2_and_write_nothing(demo_assets, tmp_path, args, message):
    out = tmp_path / "u"
    base = [
        "train",
        "--model",
        str(demo_assets.model),
        "--dataset",
        str(demo_assets.datasets["lumi"]),
        "--out",
        str(out),
    ]
    result = CliRunner().invoke(cli, [*base, "--facility", "lumi", "--no-progress", *args])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert not out.exists()


@pytest.mark.parametrize("facility", ["../escape", "a b", "x;id", "", ".hidden", "a" * 65])
def test_facility_names_that_are_not_a_safe_folder_name_are_refused(demo_assets, tmp_path, facility):
    args = ["train", "--model", str(demo_assets.model), "--dataset", str(demo_assets.datasets["lumi"])]
    result = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "u"), "--facility", facility, "--no-progress"])
    assert result.exit_code == 2 and "--facility" in result.stderr
    assert not (tmp_path / "u").exists()
