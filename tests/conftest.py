"""Shared fixtures: demo assets built once per session, and helpers that write real update directories."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from xffl_cwl import offline

offline.configure()

REPO = Path(__file__).resolve().parent.parent


def run_cli(
    *args: str | os.PathLike, check: bool = False, timeout: float = 600, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run `xffl-cwl ARGS` in a subprocess, as users and CWL tools do."""
    proc = subprocess.run(
        [sys.executable, "-m", "xffl_cwl.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"xffl-cwl {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def demo_assets(tmp_path_factory):
    from xffl_cwl.learning.demo_assets import facility_names, make_demo_assets

    return make_demo_assets(
        tmp_path_factory.mktemp("assets") / "demo",
        facility_names(3),
        samples_per_facility=1500,
        test_samples_per_task=60,
    )


def write_global(directory: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """A minimal global model directory: weights plus a config file that must be carried along."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps({"model_type": "synthetic"}))
    return directory


def write_update(
    directory: Path,
    facility: str,
    tensors: dict[str, torch.Tensor],
    base_fingerprint: str,
    samples: int = 10,
    round_number: int = 1,
    mode: str = "full",
    adapter_config: dict | None = None,
) -> Path:
    """An update directory exactly as `xffl-cwl train` lays it out, from given tensors."""
    directory.mkdir(parents=True, exist_ok=True)
    weights = "model.safetensors" if mode == "full" else "adapter_model.safetensors"
    save_file(tensors, str(directory / weights), metadata={"format": "pt"})
    if adapter_config is not None:
        (directory / "adapter_config.json").write_text(json.dumps(adapter_config))
    record = {
        "format": "xffl-update",
        "version": 1,
        "facility": facility,
        "round": round_number,
        "mode": mode,
        "samples": samples,
        "tokens": samples * 8,
        "steps": 1,
        "train_loss": {"first": 1.0, "last": 0.5, "mean": 0.7},
        "eval_loss": {"before": 1.0, "after": 0.6},
        "base_fingerprint": base_fingerprint,
    }
    (directory / "update.json").write_text(json.dumps(record))
    return directory


def write_federation(
    path: Path,
    assets,
    facilities: list[str],
    rounds: int = 2,
    steps: int = 10,
    extra: str = "",
    facility_extra: dict[str, str] | None = None,
    strategy: str = "fedavg",
) -> Path:
    """A federation.yml over demo assets with local facilities."""
    facility_extra = facility_extra or {}
    entries = "".join(
        f"  - name: {f}\n    dataset: {assets.datasets[f]}\n{facility_extra.get(f, '')}" for f in facilities
    )
    path.write_text(
        f"name: test\nrounds: {rounds}\nmodel: {assets.model}\ntest_set: {assets.test_set}\n"
        f"training:\n  local_steps: {steps}\n  seq_len: 64\n  lr: 0.003\n"
        f"aggregation:\n  strategy: {strategy}\n  min_updates: {len(facilities)}\n{extra}facilities:\n{entries}"
    )
    return path


FACILITIES_DIR = Path(os.environ.get("XFFL_FACILITIES_DIR", "/var/tmp/xffl-facilities"))


@pytest.fixture(scope="session")
def facilities() -> dict:
    """The real SLURM + sshd facilities of scripts/facilities.sh, brought up if they are not (needs root)."""
    if os.geteuid() != 0:
        pytest.fail(
            "the SLURM facility tests start daemons and users: run them as root (CI does), after `bash scripts/facilities.sh up`"
        )
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "facilities.sh"), "up"], capture_output=True, text=True, timeout=1200
    )
    if proc.returncode != 0:
        pytest.fail(f"scripts/facilities.sh up failed:\n{proc.stderr[-3000:]}")
    info = json.loads((FACILITIES_DIR / "facilities.json").read_text())
    info["by_name"] = {f["name"]: f for f in info["facilities"]}
    return info


def jobcomp(facility: dict) -> list[dict[str, str]]:
    """Finished SLURM jobs of a facility's cluster (its jobcomp/filetxt log), as key=value records."""
    path = Path(facility["jobcomp"])
    if not path.exists():
        return []
    return [
        dict(field.split("=", 1) for field in line.split() if "=" in field)
        for line in path.read_text().splitlines()
        if line.strip()
    ]


def slurm_facility_yaml(facilities: dict, name: str, dataset: str, extra: str = "", **overrides: str) -> str:
    """A facility entry of federation.yml for one of the test clusters."""
    f = facilities["by_name"][name]
    fields = {
        "host": f["host"],
        "port": str(f["port"]),
        "username": f["username"],
        "ssh_key": facilities["key"],
        "known_hosts": facilities["known_hosts"],
        "template": "generic",
        "workdir": f["workdir"],
        "polling_interval": "1",
    } | overrides
    body = "".join(f"      {k}: {v}\n" for k, v in fields.items())
    return (
        f"  - name: {name}\n    dataset: {dataset}\n    deployment:\n      kind: slurm\n{body}"
        f'      sbatch: {{partition: {f["partition"]}, time: "00:10:00"}}\n'
        f'      setup: [". {facilities["python_env"]}/bin/activate"]\n{extra}'
    )


def place_dataset(facility: dict, source: Path) -> str:
    """Copy a dataset into the facility user's home, owned by that user: the data lives on the facility."""
    import shutil

    target = Path(facility["home"]) / "data" / source.name
    if target.exists():
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    target.parent.mkdir(parents=True, exist_ok=True)
    (shutil.copytree if source.is_dir() else shutil.copy2)(source, target)
    subprocess.run(["chown", "-R", f"{facility['username']}:", str(target.parent)], check=True)
    return str(target)


def run_train(model, dataset, out, facility, round=1, device="auto", progress=True, **settings) -> dict:
    """`xffl-cwl train` as a function, its settings given flat as the CLI spells them; the update.json record."""
    from xffl_cwl.contract.options import TrainOptions, from_tool_values
    from xffl_cwl.learning.train import TrainConfig, train

    options = from_tool_values(TrainOptions, settings)
    return train(TrainConfig(model, dataset, out, facility, round, options, device, progress)).to_json()


def run_aggregate(
    global_dir, updates, out, state=None, state_out=None, round=None, chunk_elems=1024 * 1024, **settings
) -> dict:
    """`xffl-cwl aggregate` as a function, settings given flat; the aggregate.json record."""
    from xffl_cwl.contract.options import AggregateOptions, from_tool_values
    from xffl_cwl.learning.aggregation import AggregateConfig, aggregate

    options = from_tool_values(AggregateOptions, settings)
    # The workflow names each update after its facility; here the test's update.json says which it is.
    named = [f"{json.loads((Path(u) / 'update.json').read_text())['facility']}={u}" for u in updates]
    return aggregate(AggregateConfig(global_dir, named, out, options, state, state_out, round, chunk_elems)).to_json()


def facility_processes(facility: dict) -> list[str]:
    """Training processes still alive under a facility's user: a cancelled job must leave none."""
    proc = subprocess.run(["pgrep", "-u", facility["username"], "-f", "xffl-cwl train"], capture_output=True, text=True)
    alive = []
    for pid in proc.stdout.split():
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                alive.append(pid)
        except OSError:
            continue
    return alive


def squeue(facility: dict) -> list[str]:
    """This project's jobs still queued or running on a facility's cluster ("ID NAME" lines)."""
    proc = subprocess.run(
        ["squeue", "-h", "-o", "%i %j"],
        capture_output=True,
        text=True,
        env={**os.environ, "SLURM_CONF": facility["slurm_conf"]},
    )
    return [line for line in proc.stdout.splitlines() if "xffl" in line]


def wait_until(condition, timeout: float, what: str, interval: float = 0.3):
    """Poll `condition` until it returns something truthy; fail naming `what` after `timeout` seconds."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"waited {timeout:g} s for {what}")


def _facility_dir(facility: dict) -> Path:
    return Path(facility["slurm_conf"]).parent.parent


def _process_tree(pid: int) -> list[int]:
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [pid, *(p for child in children for p in _process_tree(int(child)))]


def restart_sshd(facility: dict, outage: float = 2.0) -> None:
    """Drop every SSH connection to a facility's login node and bring its sshd back after `outage` seconds."""
    import signal
    import time

    base = _facility_dir(facility)
    for pid in reversed(_process_tree(int((base / "run" / "sshd.pid").read_text()))):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    time.sleep(outage)
    config, log = base / "ssh" / "sshd_config", base / "log" / "sshd.log"
    subprocess.run(["/usr/sbin/sshd", "-f", str(config), "-E", str(log)], check=True, timeout=30)


def slurmd_alive(facility: dict) -> bool:
    pidfile = _facility_dir(facility) / "run" / "slurmd.pid"
    return pidfile.exists() and Path(f"/proc/{pidfile.read_text().strip()}").exists()


def stop_slurmd(facility: dict) -> None:
    """Stop the compute node's slurmd, as a node failure does: jobs sent there never run."""
    import signal

    pid = int((_facility_dir(facility) / "run" / "slurmd.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not Path(f"/proc/{pid}").exists(), 10, "slurmd to stop")


def start_slurmd(facility: dict) -> None:
    """Bring the compute node back and wait until SLURM schedules on it again."""
    env = {**os.environ, "SLURM_CONF": facility["slurm_conf"]}
    subprocess.run(["/usr/sbin/slurmd", "-f", facility["slurm_conf"], "-N", facility["node"]], check=True, timeout=30)
    # A job that was sent to the dead node stays COMPLETING until slurmctld's next retry (a minute or two)
    # and holds the node; an administrator clears it by taking the node down and back, as done here.
    scontrol = ["scontrol", "update", f"nodename={facility['node']}"]
    subprocess.run([*scontrol, "state=down", "reason=repaired"], env=env, capture_output=True, timeout=30)
    subprocess.run([*scontrol, "state=resume"], env=env, capture_output=True, timeout=30)

    def ready() -> bool:
        state = subprocess.run(
            ["sinfo", "-h", "-n", facility["node"], "-o", "%T"], capture_output=True, text=True, env=env
        )
        if state.stdout.strip().rstrip("*") in ("down", "drained", "drain"):
            subprocess.run(
                ["scontrol", "update", f"nodename={facility['node']}", "state=resume"], env=env, capture_output=True
            )
        return state.stdout.strip() in ("idle", "mixed", "allocated")

    wait_until(ready, 120, f"node {facility['node']} to be ready again", interval=1)
