"""The federation on two real SLURM clusters reached over SSH (scripts/facilities.sh), with the plugin."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file
from test_interruptions import _processes_of

from conftest import (
    REPO,
    facility_processes,
    jobcomp,
    place_dataset,
    restart_sshd,
    run_cli,
    slurm_facility_yaml,
    squeue,
    wait_until,
)
from xffl_cwl.federation import load_federation
from xffl_cwl.generator import generate

FACILITIES = ("leonardo", "lumi")
PODMAN = "      container: {runtime: podman, image: 'localhost/xffl-cwl:%s'}\n"


def _federation(path: Path, demo_assets, entries: str, rounds: int = 2, steps: int = 5) -> Path:
    path.write_text(
        f"name: hpc\nrounds: {rounds}\nmodel: {demo_assets.model}\ntest_set: {demo_assets.test_set}\n"
        f"training: {{local_steps: {steps}, seq_len: 64, lr: 0.003}}\n"
        f"aggregation: {{strategy: fedavgm, min_updates: 2}}\nfacilities:\n{entries}"
    )
    return path


@pytest.fixture(scope="module")
def datasets(facilities, demo_assets):
    return {name: place_dataset(facilities["by_name"][name], demo_assets.datasets[name]) for name in FACILITIES}


def _start(run_dir: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "xffl_cwl.cli", "run", str(run_dir), *args],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip


def _running(facility: dict, round_number: int) -> bool:
    return any(line.endswith(f"-round{round_number}") for line in squeue(facility))


@pytest.fixture(scope="module")
def slurm_run(facilities, demo_assets, datasets, tmp_path_factory):
    """Two rounds on the two clusters; lumi's login node drops every SSH connection while its round-1 job
    runs (its sshd is killed and started again): the connector retries and the run goes on."""
    root = tmp_path_factory.mktemp("hpc")
    entries = "".join(slurm_facility_yaml(facilities, name, datasets[name]) for name in FACILITIES)
    federation = _federation(root / "federation.yml", demo_assets, entries)
    generate(load_federation(federation), root / "run")
    before = {name: len(jobcomp(facilities["by_name"][name])) for name in FACILITIES}
    proc = _start(root / "run")
    try:
        wait_until(lambda: _running(facilities["by_name"]["lumi"], 1) or proc.poll() is not None, 120, "lumi's job")
        status = run_cli("status", root / "run", timeout=60)  # from another terminal, while round 1 runs
        restart_sshd(facilities["by_name"]["lumi"])
        _, err = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    new_jobs = {name: jobcomp(facilities["by_name"][name])[before[name] :] for name in FACILITIES}
    return {
        "root": root, "run": root / "run", "federation": federation, "stderr": err, "jobs": new_jobs, "status": status,
    }  # fmt: skip


def test_a_dropped_ssh_connection_is_retried(slurm_run):
    log = (slurm_run["run"] / "streamflow.log").read_text()
    # StreamFlow's SSH layer reconnects (its `retries`); what it gives up on, the connector retries with back-off
    dropped = [
        line for line in log.splitlines() if " WARNING " in line and ("2223" in line or "deployment lumi" in line)
    ]
    assert any("connection closed" in line.lower() or "trying again" in line for line in dropped), dropped
    assert "left out" not in log and "left out" not in slurm_run["stderr"]


def test_status_shows_the_round_in_progress(slurm_run):
    status = slurm_run["status"]
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert lines[0].startswith("hpc: running, round 1 of 2 in progress"), lines
    lumi = next(line for line in lines if line.strip().startswith("lumi "))
    assert re.search(r"round 1: (queued|training) for \d+ s \(SLURM job \d+\)", lumi), lumi
    assert "global held-out loss:" in status.stdout and "(initial model)" in status.stdout


def test_report_of_the_slurm_run(slurm_run, facilities):
    """Queue wait and run time from SLURM, staging over SSH, bytes to and from each cluster."""
    from report_checks import check_report

    _, data = check_report(slurm_run["run"], [1, 2], list(FACILITIES))
    for name in FACILITIES:
        ended = [
            json.loads(line)
            for line in (slurm_run["run"] / ".xffl" / "jobs" / f"{name}.jsonl").read_text().splitlines()
        ]
        ended = [e for e in ended if e["event"] == "ended"]
        assert len(ended) == 2 and all(e["queued_s"] >= 0 and e["ran_s"] > 0 for e in ended), ended
        first, second = (r["facilities"][name] for r in data["rounds"])
        assert first["phases"]["staging in"] > 0 and first["down_kind"] == "model"
        assert second["down_kind"] == "change" and second["bytes_down"] < first["bytes_down"] * 1.1
        assert all(f["phases"]["staging out"] > 0 and f["phases"]["training"] > 0 for f in (first, second))


def test_two_rounds_complete_on_slurm(slurm_run):
    from transformers import AutoModelForCausalLM

    history = [json.loads(line) for line in (slurm_run["run"] / "out" / "history.jsonl").read_text().splitlines()]
    assert [h["round"] for h in history] == [0, 1, 2]
    assert history[-1]["eval_loss"] < history[0]["eval_loss"]
    assert set(history[-1]["facilities"]) == set(FACILITIES)
    AutoModelForCausalLM.from_pretrained(slurm_run["run"] / "out" / "model", local_files_only=True)


def test_every_training_step_was_a_slurm_job_on_its_own_cluster(slurm_run, facilities):
    log = (slurm_run["run"] / "streamflow.log").read_text()
    for name in FACILITIES:
        facility = facilities["by_name"][name]
        jobs = {job["Name"]: job for job in slurm_run["jobs"][name]}
        assert sorted(jobs) == [f"xffl-train_{name}-0.0-round1", f"xffl-train_{name}-0.1-round2"], jobs.keys()
        for job in jobs.values():
            assert job["JobState"] == "COMPLETED"
            assert job["UserId"].startswith(facility["username"] + "(")
            assert job["WorkDir"].startswith(facility["workdir"] + "/")
            assert job["NodeList"] == facility["node"]
        for round_number, iteration in ((1, "0.0"), (2, "0.1")):
            scheduled = re.search(
                rf"Scheduled job /federation/train_{name}/{iteration} with job id (\d+) on {name}", log
            )
            assert scheduled and scheduled[1] == jobs[f"xffl-train_{name}-{iteration}-round{round_number}"]["JobId"]
        # the data stayed on the facility: the train job read it from its own home, not from here
        assert re.search(
            rf"COPYING from {re.escape(facility['home'])}/data/{name} to {re.escape(facility['workdir'])}/\S+ on location {name}/",
            log,
        )


def test_aggregation_and_evaluation_ran_on_the_aggregator(slurm_run):
    log = (slurm_run["run"] / "streamflow.log").read_text()
    for step in ("aggregate", "evaluate"):
        lines = re.findall(rf"EXECUTING step /federation/{step} \(job \S+\) (.*) into directory (\S+?):?$", log, re.M)
        assert len(lines) == 2
        for where, directory in lines:
            assert where == "locally" and directory.startswith(str(slurm_run["run"] / "work" / "aggregator"))
    assert len(list((slurm_run["run"] / "work" / "aggregator").glob("*/model/aggregate.json"))) == 2
    assert not any(
        "aggregate" in job["Name"] or "evaluate" in job["Name"] for jobs in slurm_run["jobs"].values() for job in jobs
    )


def test_check_finds_every_facility_ready(slurm_run):
    proc = run_cli("check", slurm_run["federation"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line.split()[:3] for line in proc.stdout.splitlines()[1:]]
    for name in FACILITIES:
        assert {what: result for facility, what, result in rows if facility == name} == {
            "template": "ok",
            "login": "ok",
            "sbatch": "ok",
            "partition": "ok",
            "xffl-cwl": "ok",
            "dataset": "ok",
            "workdir": "ok",
        }


@pytest.fixture
def good_run(facilities, demo_assets, datasets, tmp_path):
    """A valid run folder to break by hand, and a way to see that no job was submitted."""
    entries = "".join(slurm_facility_yaml(facilities, name, datasets[name]) for name in FACILITIES)
    federation = _federation(tmp_path / "federation.yml", demo_assets, entries, rounds=1)
    generate(load_federation(federation), tmp_path / "run")

    def counts():
        return [len(jobcomp(facilities["by_name"][n])) + len(squeue(facilities["by_name"][n])) for n in FACILITIES]

    return tmp_path / "run", counts


BAD_CONFIG = {
    "wrong key path": (
        r"sshKey: \S+",
        "sshKey: /nonexistent/id_ed25519",
        "ssh key",
        "/nonexistent/id_ed25519 does not exist",
    ),
    "unknown host key": (r"knownHosts: \S+", "knownHosts: {empty}", "host key", "127.0.0.1:2222 is not trusted by"),
    "unreachable host": (r"port: 2222", "port: 2299", "reachable", "cannot reach 127.0.0.1:2299"),
    "template without placeholder": (
        r"template: generic",
        "template: {broken}",
        "template",
        "has no {{streamflow_command}} placeholder",
    ),
    "unknown preset": (
        r"template: generic",
        "template: leonard",
        "template",
        "unknown SLURM template preset 'leonard'",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIG))
def test_bad_facility_configuration_is_one_clear_error_before_any_job(good_run, tmp_path, case):
    run, counts = good_run
    pattern, replacement, check, detail = BAD_CONFIG[case]
    (tmp_path / "empty_known_hosts").write_text("")
    (run / "broken.sh").write_text("#!/bin/bash\n#SBATCH --time=5\necho the command is missing\n")
    replacement = replacement.format(empty=tmp_path / "empty_known_hosts", broken="broken.sh")
    config = (run / "streamflow.yml").read_text()
    first = re.search(r"  leonardo:\n    type: xffl-facility\n(    .*\n)+", config)
    (run / "streamflow.yml").write_text(
        config[: first.start()] + re.sub(pattern, replacement, first[0], count=1) + config[first.end() :]
    )
    before = counts()
    started = time.monotonic()
    proc = run_cli("run", run, timeout=120)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and f"facility leonardo: {check}: " in errors[0] and detail in errors[0], proc.stderr
    assert time.monotonic() - started < 30
    assert not (run / "streamflow.log").exists(), "StreamFlow must not have started"
    assert counts() == before, "no SLURM job may have been submitted"


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("ssh_key", "/nonexistent/key", "deployment.ssh_key: /nonexistent/key does not exist"),
        ("template", "leonard", "deployment.template: unknown SLURM template preset 'leonard'"),
        ("template", "{broken}", "has no {{streamflow_command}} placeholder"),
    ],
)
def test_generate_refuses_bad_facilities(facilities, demo_assets, tmp_path, key, value, message):
    (tmp_path / "broken.sh").write_text("#!/bin/bash\necho missing\n")
    entry = slurm_facility_yaml(
        facilities, "leonardo", "/home/hpc_leonardo/data/leonardo", **{key: value.format(broken=tmp_path / "broken.sh")}
    )
    federation = _federation(tmp_path / "federation.yml", demo_assets, entry)
    federation.write_text(federation.read_text().replace("min_updates: 2", "min_updates: 1"))
    proc = run_cli("generate", federation, "-o", tmp_path / "run")
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_unknown_host_key_fails_check_with_a_fix(facilities, demo_assets, datasets, tmp_path):
    (tmp_path / "known_hosts").write_text("")
    entries = slurm_facility_yaml(
        facilities, "leonardo", datasets["leonardo"], known_hosts=str(tmp_path / "known_hosts")
    )
    entries += slurm_facility_yaml(facilities, "lumi", datasets["lumi"])
    federation = _federation(tmp_path / "federation.yml", demo_assets, entries)
    proc = run_cli("check", federation)
    assert proc.returncode == 1
    rows = {tuple(line.split()[:3]) for line in proc.stdout.splitlines()}
    assert ("leonardo", "host", "key") in rows or any(r[0] == "leonardo" and r[1] == "host" for r in rows)
    assert "ssh-keyscan -p 2222 127.0.0.1 >>" in proc.stdout
    assert ("lumi", "login", "ok") in rows and ("lumi", "workdir", "ok") in rows


def test_interrupted_and_killed_slurm_runs_in_the_image_leave_nothing_and_resume_to_the_same_model(
    facilities, demo_assets, datasets, slurm_run, tmp_path
):
    """The same two rounds with every train job inside the xffl-cwl image (rootless podman, through SLURM).
    SIGTERM while round 1's jobs run: within 30 s no StreamFlow, no tool, no SLURM job, no container and no
    training process of the run remains (scancel reaches the training through podman and the image's tini);
    --resume; the orchestrator SIGKILLed while round 2's jobs run (they are left on the clusters); --resume
    cancels them from the job journal, trains round 2 again and never round 1. The model is that of the
    uninterrupted bare run bit for bit, and the records name the image, its digest on each cluster and the
    build that only the image carries."""
    from xffl_cwl import __version__

    clusters = [facilities["by_name"][name] for name in FACILITIES]
    entries = "".join(
        slurm_facility_yaml(facilities, name, datasets[name], extra=PODMAN % __version__) for name in FACILITIES
    )
    federation = _federation(tmp_path / "federation.yml", demo_assets, entries)
    assert run_cli("check", federation).returncode == 0
    run_dir = tmp_path / "run"
    generate(load_federation(federation), run_dir)

    def nothing_left() -> bool:
        return not any(
            squeue(c) or facility_processes(c) or _podman(c["username"], "ps", "-aq") for c in clusters
        ) and not _processes_of(run_dir)

    before = {name: len(jobcomp(facilities["by_name"][name])) for name in FACILITIES}
    proc = _start(run_dir)
    try:
        wait_until(lambda: all(_running(c, 1) for c in clusters) or proc.poll() is not None, 180, "round 1's jobs")
        wait_until(lambda: all(facility_processes(c) for c in clusters), 60, "training inside the containers")
        stopped = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
        wait_until(nothing_left, 30, "no job, container or training left")
        clean_after = time.monotonic() - stopped
        # well before the round's training would end on its own: a container that outlived its cancelled
        # job (podman's conmon is outside the job's processes) would show here
        assert clean_after < 10, clean_after
        assert f"Resume with: xffl-cwl run {run_dir} --resume" in err

        proc = _start(run_dir, "--resume")
        wait_until(lambda: all(_running(c, 2) for c in clusters) or proc.poll() is not None, 240, "round 2's jobs")
        # the machine running StreamFlow dies: the orchestrator and StreamFlow, with no chance to clean up
        for pid in [proc.pid] + [int(p.split(":")[0]) for p in _processes_of(run_dir)]:
            os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=10)
        left = [line for c in clusters for line in squeue(c)]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    resuming = time.monotonic()
    resumed = run_cli("run", run_dir, "--resume", timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "attempt 3: from round 2" in resumed.stderr
    print(f"SIGTERM: nothing left after {clean_after:.1f} s; resume after SIGKILL: {time.monotonic() - resuming:.1f} s")
    assert left, "the killed run left its round-2 jobs on the clusters"
    # the resume found them in the job journal (those that had not finished meanwhile are cancelled)
    assert re.search(r"(leonardo|lumi): (cancelled SLURM job\(s\) \d+|no job left in the queue)", resumed.stderr)
    assert not any(squeue(c) for c in clusters)
    wait_until(nothing_left, 30, "the cancelled jobs' processes and containers to end")
    for name in FACILITIES:
        jobs = [
            (j["Name"].rsplit("-", 1)[1], j["JobState"]) for j in jobcomp(facilities["by_name"][name])[before[name] :]
        ]
        completed = [r for r, state in jobs if state == "COMPLETED"]
        assert completed.count("round1") == 1, jobs  # round 1 was trained once to the end, never again
        assert completed[-1] == "round2" and jobs[0] == ("round1", "CANCELLED"), jobs
    ours = load_file(str(run_dir / "out" / "model" / "model.safetensors"))
    theirs = load_file(str(slurm_run["run"] / "out" / "model" / "model.safetensors"))
    assert sorted(ours) == sorted(theirs) and all((ours[k] == theirs[k]).all() for k in ours), "not bit for bit"
    image = f"localhost/xffl-cwl:{__version__}"
    label = subprocess.run(
        ["podman", "image", "inspect", "--format", '{{index .Labels "org.xffl-cwl.inputs"}}', image],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    records = sorted((run_dir / "work" / "aggregator").glob("*/model/aggregate.json"))
    assert records
    for record in map(json.loads, (r.read_text() for r in records)):
        assert record["container"]["runtime"] == "none"  # the aggregator ran bare, here
        for name in FACILITIES:
            digest = _podman(facilities["by_name"][name]["username"], "image", "inspect", "--format", "{{.Id}}", image)
            assert record["facilities"][name]["container"] == {
                "runtime": "podman", "image": image, "digest": f"sha256:{digest}", "build": label,
            }  # fmt: skip


def test_a_two_task_train_job_through_srun_trains_as_one_task(facilities, demo_assets, datasets, slurm_run, tmp_path):
    """leonardo's train steps run as one allocation of 2 tasks (`ntasks_per_node: 2`), its workers
    started by srun, half the micro-batch each: the job logs show both ranks and the round's global
    model is that of the 1-task run's first round within fp32 tolerance."""
    leonardo = (
        slurm_facility_yaml(facilities, "leonardo", datasets["leonardo"]).replace(
            'time: "00:10:00"}', 'time: "00:10:00", ntasks_per_node: 2}'
        )
        + "    training: {batch_size: 4}\n"
    )
    entries = leonardo + slurm_facility_yaml(facilities, "lumi", datasets["lumi"])
    federation = _federation(tmp_path / "federation.yml", demo_assets, entries, rounds=1)
    generate(load_federation(federation), tmp_path / "run")
    round_cwl = (tmp_path / "run" / "round.cwl").read_text()
    assert "nproc_per_node: {default: 2}" in round_cwl
    before = len(jobcomp(facilities["by_name"]["leonardo"]))
    proc = run_cli("run", tmp_path / "run", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = jobcomp(facilities["by_name"]["leonardo"])[before:]
    assert [j["JobState"] for j in jobs] == ["COMPLETED"] and all(j["ProcCnt"] == "2" for j in jobs), jobs
    for job in jobs:
        log = (Path(job["WorkDir"]) / "train.log").read_text()
        assert "2 workers (1 node(s) x 2) started with srun" in log, log[-2000:]
        assert "worker 0 of 2: peak RSS" in log and "worker 1 of 2: peak RSS" in log, log[-2000:]
    last = json.loads((tmp_path / "run" / "out" / "history.jsonl").read_text().splitlines()[-1])
    assert set(last["facilities"]) == set(FACILITIES) and not last.get("left_out")
    ours = load_file(str(tmp_path / "run" / "out" / "model" / "model.safetensors"))
    first = next(
        path.parent
        for path in (slurm_run["run"] / "work" / "aggregator").glob("*/model/aggregate.json")
        if json.loads(path.read_text())["round"] == 1
    )
    theirs = load_file(str(first / "model.safetensors"))
    diff = max((ours[k] - theirs[k]).abs().max().item() for k in ours)
    print(f"2 tasks vs 1 task on SLURM, round 1: largest weight difference {diff:.2e}")
    assert diff < 1e-4, diff


@pytest.mark.parametrize(
    "container, check, detail",
    [
        ("{runtime: podman, image: 'localhost/xffl-cwl:9.9.9'}", "container image", "xffl-cwl:9.9.9 is not in this user's podman storage"),
        ("{runtime: podman, image: 'localhost/xffl-client:0.1.0'}", "container image", "xffl-client:0.1.0 is not in this user's podman storage"),
        ("{runtime: apptainer, image: /home/hpc_leonardo/xffl-cwl.sif}", "container runtime", "apptainer not found after the setup lines"),
    ],
    ids=["wrong tag", "image never loaded", "runtime the facility lacks"],
)  # fmt: skip
def test_a_container_the_facility_cannot_run_is_one_line_before_any_job(
    facilities, demo_assets, datasets, good_run, tmp_path, container, check, detail
):
    _, counts = good_run
    entries = slurm_facility_yaml(facilities, "leonardo", datasets["leonardo"], extra=f"      container: {container}\n")
    entries += slurm_facility_yaml(facilities, "lumi", datasets["lumi"])
    root = tmp_path / "container"
    root.mkdir()
    federation = _federation(root / "federation.yml", demo_assets, entries)
    before = counts()
    proc = run_cli("check", federation)
    assert proc.returncode == 1
    failed = [line for line in proc.stdout.splitlines() if line.split()[:1] == ["leonardo"] and " FAIL" in line]
    assert len(failed) == 1 and check in failed[0] and detail in failed[0], proc.stdout
    generate(load_federation(federation), root / "run")
    proc = run_cli("run", root / "run", timeout=120)
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr
    assert f"facility leonardo: {check}: " in errors[0] and detail in errors[0], proc.stderr
    assert not (root / "run" / "streamflow.log").exists() and counts() == before


def _podman(user: str, *args: str) -> str:
    return subprocess.run(
        ["runuser", "-u", user, "--", "podman", *args], cwd="/", capture_output=True, text=True, check=True
    ).stdout.strip()
