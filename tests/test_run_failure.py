"""A federation that survives its facilities, on this machine: quorum rounds with StreamFlow and with
cwltool, a run below quorum that stops in bounded time naming everyone, interruptions that leave
nothing running and resume to the same model, and run folders that `run` refuses to mix up."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file
from test_interruptions import _processes_of

from conftest import REPO, run_cli, write_federation
from xffl_cwl.execution.attempt import Attempt, StopRequest, run_attempt
from xffl_cwl.execution.run_folder import read_run_folder
from xffl_cwl.federation import load_federation
from xffl_cwl.generator import generate

BROKEN = '{"text": "fine"}\n{not json\n'


INT8 = ("  uplink: int8\n", "  downlink: int8\n")  # (training:, aggregation:) lines


def _folder(
    tmp_path: Path,
    demo_assets,
    facilities: list[str],
    rounds: int,
    min_updates: int,
    name: str = "run",
    transfer: tuple[str, str] = ("", ""),
) -> Path:
    """A federation of local facilities, without a test set: rounds are then recorded without a global
    held-out loss, which these tests do not need and which would cost a model load per round."""
    path = write_federation(tmp_path / f"{name}.yml", demo_assets, facilities, rounds=rounds, steps=3)
    text = path.read_text().replace(f"min_updates: {len(facilities)}", f"min_updates: {min_updates}")
    text = text.replace("training:\n", "training:\n" + transfer[0]).replace(
        "aggregation:\n", "aggregation:\n" + transfer[1]
    )
    path.write_text(text.replace(f"test_set: {demo_assets.test_set}\n", ""))
    generate(load_federation(path), tmp_path / name)
    return tmp_path / name


def _history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "out" / "history.jsonl").read_text().splitlines()]


def test_a_facility_that_fails_in_one_round_is_left_out_of_that_round_only(tmp_path, demo_assets):
    """lumi's data is broken during round 1 only: round 1 merges the other two, round 2 all three."""
    import shutil

    from xffl_cwl.execution.supervisor import history_table, run

    data = tmp_path / "lumi-data"
    shutil.copytree(demo_assets.datasets["lumi"], data)
    run_dir = _folder(tmp_path, demo_assets, ["leonardo", "lumi", "meluxina"], 2, 2)
    order = (run_dir / "inputs.yml").read_text()
    (run_dir / "inputs.yml").write_text(order.replace(str(demo_assets.datasets["lumi"]), str(data)))
    said: list[str] = []
    for name in ("state.json", "dataset_info.json"):  # lumi's data is broken until round 1 is aggregated
        (data / name).rename(tmp_path / name)
    (data / "broken.jsonl").write_text(BROKEN)

    def say(text: str) -> None:
        said.append(text)
        if text.startswith("round 1/2: aggregated"):
            (data / "broken.jsonl").unlink()
            for name in ("state.json", "dataset_info.json"):
                (tmp_path / name).rename(data / name)

    result = run(run_dir, say=say, check=False)
    assert result.ok, (result.failure, said[-5:])
    history = _history(run_dir)
    assert [h["round"] for h in history] == [0, 1, 2]
    assert set(history[1]["facilities"]) == {"leonardo", "meluxina"}
    assert [x["facility"] for x in history[1]["left_out"]] == ["lumi"]
    assert "is not valid JSON" in history[1]["left_out"][0]["reason"]
    assert set(history[2]["facilities"]) == {"leonardo", "lumi", "meluxina"} and history[2]["left_out"] == []
    assert any("round 1/2: lumi is left out of this round" in s for s in said)
    table = history_table(result.history)
    assert "left out" in table and "round 1: lumi left out:" in table
    # the report shows who was left out, when and why
    from report_checks import check_report

    page, data = check_report(run_dir, [1, 2], ["leonardo", "lumi", "meluxina"])
    lumi = data["rounds"][0]["facilities"]["lumi"]
    assert lumi["status"] == "left out" and "is not valid JSON" in lumi["reason"] and lumi["bytes_up"] is None
    assert data["rounds"][1]["facilities"]["lumi"]["status"] == "merged"
    left = next(t for t in page.tables if t and t[0] == ["round", "facility", "what", "why"])
    assert [row[:3] for row in left[1:]] == [["1", "lumi", "left out"]] and "is not valid JSON" in left[1][3]


def test_quorum_rounds_behave_the_same_under_cwltool(tmp_path, demo_assets):
    """lumi fails in every round (broken data), meluxina is left out of round 1 by the orchestrator's
    input and rejoins in round 2: StreamFlow and cwltool give the same history and the same final model,
    bit for bit."""
    broken = tmp_path / "broken.jsonl"
    broken.write_text(BROKEN)
    # with int8 updates and changes: facilities keep their copy of the model and are sent the change
    run_dir = _folder(tmp_path, demo_assets, ["leonardo", "lumi", "meluxina"], 2, 1, transfer=INT8)
    order = (run_dir / "inputs.yml").read_text().replace(str(demo_assets.datasets["lumi"]), str(broken))
    order = order.replace(f"class: Directory, path: {broken}", f"class: File, path: {broken}")
    (run_dir / "inputs.yml").write_text(order + 'left_out: ["meluxina@1: down for maintenance"]\n')
    # both runners at once, on the same run folder: cwltool only reads it and writes under --outdir
    command = [sys.executable, "-m", "cwltool", "--enable-ext", "--no-container", "--outdir", str(tmp_path / "cwl")]
    cwltool = subprocess.Popen(
        [*command, "main.cwl", "inputs.yml"], cwd=run_dir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        proc = run_cli("run", run_dir, "--no-check", timeout=600)
        _, cwltool_err = cwltool.communicate(timeout=900)
    finally:
        cwltool.kill()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert cwltool.returncode == 0 and "permanentFail" not in cwltool_err, cwltool_err[-3000:]
    theirs = [json.loads(line) for line in (tmp_path / "cwl" / "history.jsonl").read_text().splitlines()]
    for h in (_history(run_dir), theirs):
        assert [line["round"] for line in h] == [0, 1, 2]
        assert set(h[1]["facilities"]) == {"leonardo"}
        assert sorted(x["facility"] for x in h[1]["left_out"]) == ["lumi", "meluxina"]
        assert any(x["reason"] == "down for maintenance" for x in h[1]["left_out"])
        assert set(h[2]["facilities"]) == {"leonardo", "meluxina"}
        assert [x["facility"] for x in h[2]["left_out"]] == ["lumi"]
    a = load_file(str(run_dir / "out" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "cwl" / "model" / "model.safetensors"))
    assert sorted(a) == sorted(b) and all((a[k] == b[k]).all() for k in a), "not bit for bit"
    # StreamFlow's data locality: the global model is staged to a facility only when it has no copy (leonardo
    # in round 1; meluxina, left out of round 1, in round 2), else its own copy and the aggregator's change
    staged = {
        f: sorted(p.name for p in (run_dir / "work" / f).glob("*/*/*") if p.is_symlink())
        for f in ("leonardo", "meluxina")
    }
    assert staged["leonardo"].count("model") == 1 and staged["leonardo"].count("model.local") == 1, staged
    assert staged["meluxina"].count("model") == 1 and "model.local" not in staged["meluxina"], staged
    model_bytes = (run_dir / "out" / "model" / "model.safetensors").stat().st_size
    for record in (json.loads(p.read_text()) for p in run_dir.glob("work/aggregator/*/model/aggregate.json")):
        assert record["change"]["encoding"] == "int8" and record["change"]["bytes"] < 0.3 * model_bytes
    updates = list(run_dir.glob("work/leonardo/*/leonardo/delta.safetensors"))
    assert len(updates) == 2 and all(p.stat().st_size < 0.3 * model_bytes for p in updates)
    assert list(run_dir.glob("work/leonardo/*/model.local/uplink/residual.safetensors"))


def test_below_quorum_the_run_stops_in_bounded_time_naming_everyone(tmp_path, demo_assets):
    broken = tmp_path / "broken.jsonl"
    broken.write_text(BROKEN)
    run_dir = _folder(tmp_path, demo_assets, ["leonardo", "lumi"], 2, 2)
    order = (run_dir / "inputs.yml").read_text()
    (run_dir / "inputs.yml").write_text(
        order.replace(str(demo_assets.datasets["lumi"]), str(broken)).replace(
            f"class: Directory, path: {broken}", f"class: File, path: {broken}"
        )
    )
    started = time.monotonic()
    proc = run_cli("run", run_dir, "--grace", "2", timeout=300)
    assert proc.returncode == 1
    assert time.monotonic() - started < 60
    error = next(line for line in proc.stderr.splitlines() if line.startswith("xffl-cwl run: error:"))
    assert "step aggregate (on aggregator) failed in round 1/2" in error
    assert "only 1 valid update(s) of 2, --min-updates is 2" in error
    assert "lumi: left out, failed: " in error and "broken.jsonl:2 is not valid JSON" in error
    assert "--resume" in proc.stderr
    assert not (run_dir / "out" / "model").exists()
    assert not _processes_of(run_dir)


def test_failed_aggregation_is_named(tmp_path, demo_assets):
    # min_updates above the number of facilities cannot be generated, so break it by hand in round.cwl
    run_dir = _folder(tmp_path, demo_assets, ["leonardo"], 1, 1)
    round_cwl = run_dir / "round.cwl"
    round_cwl.write_text(round_cwl.read_text().replace("min_updates: {default: 1}", "min_updates: {default: 5}"))
    started = time.monotonic()
    proc = run_cli("run", run_dir, "--grace", "2", timeout=300)
    assert proc.returncode == 1 and time.monotonic() - started < 60
    error = next(line for line in proc.stderr.splitlines() if line.startswith("xffl-cwl run: error:"))
    assert "step aggregate (on aggregator) failed in round 1/1" in error
    assert "--min-updates is 5" in error and error.endswith("aggregate.log")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, demo_assets):
    """A 2-round run that nobody interrupts, to compare resumed runs with."""
    tmp = tmp_path_factory.mktemp("reference")
    run_dir = _folder(tmp, demo_assets, ["leonardo", "lumi"], 2, 2)
    proc = run_cli("run", run_dir, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def _start(run_dir: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "xffl_cwl.cli", "run", str(run_dir), *args],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip


def _wait_for_round(run_dir: Path, round_number: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    rounds = run_dir / ".xffl" / "rounds.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if rounds.exists() and f'"round": {round_number},' in rounds.read_text():
            return
        time.sleep(0.2)
    raise AssertionError(
        f"round {round_number} was not recorded; stderr: {proc.stderr.read() if proc.poll() is not None else ''}"
    )


def test_interrupted_and_killed_runs_leave_nothing_and_resume_to_the_same_model(tmp_path, demo_assets, reference):
    """Ctrl-C in round 1 stops everything within 30 s; --resume; the orchestrator killed (SIGKILL) in round
    2; --resume again: the final model is that of the run nobody touched, bit for bit, and no completed
    round was trained twice."""
    run_dir = _folder(tmp_path, demo_assets, ["leonardo", "lumi"], 2, 2)
    proc = _start(run_dir)
    _wait_for_round(run_dir, 0, proc)
    time.sleep(1.5)  # round 1 is training
    stopped = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGINT, err[-2000:]
    _nothing_left(run_dir, stopped)
    assert f"Resume with: xffl-cwl run {run_dir} --resume" in err
    refused = run_cli("run", run_dir)
    assert refused.returncode == 2 and "--resume" in refused.stderr and "--force" in refused.stderr

    proc = _start(run_dir, "--resume")
    _wait_for_round(run_dir, 1, proc)
    time.sleep(1.0)  # round 2 is training
    os.killpg(proc.pid, signal.SIGKILL)  # the orchestrator, with no chance to clean up
    proc.wait(timeout=10)
    status = run_cli("status", run_dir)
    assert status.returncode == 0 and status.stdout.startswith("test: stopped (attempt 2), 1 of 2 rounds done")
    resumed = run_cli("run", run_dir, "--resume", timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "attempt 3: from round 2" in resumed.stderr  # round 1 was not trained again
    assert (run_dir / ".xffl" / "rounds.jsonl").read_text().count('"round": 1,') == 1
    assert [h["round"] for h in _history(run_dir)] == [0, 1, 2]
    _same_model(run_dir, reference)
    # the report of a run made of three attempts: every round once, from the attempt that completed it
    from report_checks import check_report

    _, data = check_report(run_dir, [1, 2], ["leonardo", "lumi"])
    assert all(f["status"] == "merged" for r in data["rounds"] for f in r["facilities"].values())
    finished = run_cli("run", run_dir)
    assert finished.returncode == 2 and "holds a finished run" in finished.stderr and "--force" in finished.stderr


def _nothing_left(run_dir: Path, since: float) -> None:
    deadline = since + 30
    while _processes_of(run_dir) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _processes_of(run_dir), "StreamFlow or a tool is still running 30 s after the signal"


def _same_model(run_dir: Path, reference: Path) -> None:
    ours = load_file(str(run_dir / "out" / "model" / "model.safetensors"))
    theirs = load_file(str(reference / "out" / "model" / "model.safetensors"))
    assert sorted(ours) == sorted(theirs) and all((ours[k] == theirs[k]).all() for k in ours), "not bit for bit"


def test_force_starts_over_and_a_second_run_is_locked_out(tmp_path, demo_assets, reference):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(reference, copy, symlinks=True)
    assert run_cli("run", copy).returncode == 2
    proc = _start(copy, "--force")
    deadline = time.monotonic() + 60
    while not (copy / ".xffl" / "run.json").exists() or '"running"' not in (copy / ".xffl" / "run.json").read_text():
        assert time.monotonic() < deadline
        time.sleep(0.2)
    second = run_cli("run", copy, "--resume")
    assert second.returncode == 2 and "another xffl-cwl run" in second.stderr
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    assert not (copy / "out" / "model").exists(), "--force removed the earlier outputs"


def test_streamflow_errors_that_are_not_job_failures_end_the_attempt(tmp_path, demo_assets):
    """A missing input makes StreamFlow log `ERROR Token ... is not optional` and idle forever; the
    watchdog stops it (xffl-cwl run refuses such a folder before: this drives one attempt directly)."""
    run_dir = _folder(tmp_path, demo_assets, ["leonardo"], 1, 1)
    from ruamel.yaml import YAML

    order = YAML(typ="safe").load((run_dir / "inputs.yml").read_text())
    del order["dataset_leonardo"]
    with open(run_dir / "inputs.yml", "w") as fh:
        YAML().dump(order, fh)
    folder = read_run_folder(run_dir)
    said: list[str] = []
    attempt = Attempt(
        folder, run_dir / "streamflow.yml", 1, 1, "model", None, run_dir / "out", run_dir / "streamflow.log",
        said.append, lambda _d: None, lambda _p: None, StopRequest(), grace=3, stall=30,
    )  # fmt: skip
    started = time.monotonic()
    result = run_attempt(attempt)
    assert not result.ok and time.monotonic() - started < 60
    assert "StreamFlow:" in result.failure and "dataset_leonardo" in result.failure
    deadline = time.monotonic() + 10
    while _processes_of(run_dir) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _processes_of(run_dir)


HAND_MISTAKES = {
    "binding to no step": (
        "streamflow.yml",
        "step: /federation/train_lumi\n",
        "step: /federation/train_lumii\n",
        "names no step",
    ),
    "missing input": ("inputs.yml", "rounds: 1\n", "", "no value for the workflow input 'rounds'"),
    "missing dataset": ("inputs.yml", "data/lumi\n", "data/nowhere\n", "which does not exist"),
    "update not aggregated": (
        "round.cwl",
        "train_lumi/update]",
        "train_leonardo/update]",
        "does not receive train_lumi/update",
    ),
    "status not aggregated": (
        "round.cwl",
        "train_lumi/status]",
        "train_leonardo/status]",
        "does not receive train_lumi/status",
    ),
}


@pytest.mark.parametrize("case", sorted(HAND_MISTAKES))
def test_hand_editing_mistakes_are_refused_by_validate_and_run(tmp_path, demo_assets, case):
    run_dir = _folder(tmp_path, demo_assets, ["leonardo", "lumi"], 1, 1)
    name, old, new, message = HAND_MISTAKES[case]
    text = (run_dir / name).read_text()
    assert old in text
    (run_dir / name).write_text(text.replace(old, new, 1))
    validated = run_cli("validate", run_dir, "--no-runners")
    assert validated.returncode == 2 and message in validated.stderr
    ran = run_cli("run", run_dir)
    assert ran.returncode == 2 and message in ran.stderr and len(ran.stderr.strip().splitlines()) == 1
    assert not (run_dir / "streamflow.log").exists(), "nothing was started"


def test_run_refuses_a_folder_that_is_not_a_run(tmp_path):
    proc = run_cli("run", tmp_path / "nothing")
    assert proc.returncode == 2 and "does not exist" in proc.stderr
