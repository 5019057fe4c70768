"""Per-round orchestration overhead of the generated workflow under StreamFlow and under cwltool.

    python benchmarks/round_overhead.py [--repeats 3] [--rounds 2] [--steps 3] [--workdir DIR]

Builds the demo assets, writes a federation.yml of two local facilities (leonardo, lumi; no test set,
so each round's evaluate step only records the aggregator's summary) and runs it, alternately, through
`xffl-cwl run` (StreamFlow) and `cwltool --enable-ext --no-container main.cwl inputs.yml`, each run in a
freshly generated run folder, so that a noisy, shared machine slows both alike. Per run:

- wall: the runner's whole process, start to exit;
- tools: the critical path of the tools' own recorded times, per round the slowest facility's train
  (update.json wall_seconds) plus the aggregation (aggregate.json seconds); evaluate records no time of
  its own, nor does any tool record its interpreter's start and imports, so those are orchestration here;
- overhead per round = (wall - tools) / rounds;
- own per round: what is left of the overhead once the tools' start-up is taken off (below), and, for
  cwltool without --parallel, which runs one step at a time, against the serial sum of the tools (every
  train one after the other) rather than the critical path: the runner's own cost.

Before the runs, the same tools are run once by hand, outside any workflow, to measure what a step costs
beyond its record (process start, imports, loading): a train's process time minus its wall_seconds, an
aggregate's minus its seconds, a summary-only evaluate; a round has one train start-up on its critical
path (the facilities start together) or, run one step at a time, one per facility, plus an aggregate and
an evaluate, and a run has one more evaluate (the baseline). Prints every run, the medians and the
ratios StreamFlow / cwltool.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

FACILITIES = ("leonardo", "lumi")
RUNNERS = ("streamflow", "cwltool")


@dataclass
class Run:
    """One federation run: its runner, wall seconds, and the tools' critical path and serial sum in seconds."""

    runner: str
    wall: float
    tools: float
    serial: float
    rounds: int
    sequential: bool

    @property
    def overhead(self) -> float:
        return (self.wall - self.tools) / self.rounds

    def own(self, startup: Startup) -> float:
        """Overhead per round beyond the tools' own start-up and, if steps ran one at a time, their order."""
        path = self.serial if self.sequential else self.tools
        trains = len(FACILITIES) if self.sequential else 1
        return (self.wall - path) / self.rounds - startup.per_round(trains, self.rounds)


@dataclass
class Startup:
    """Seconds a step costs beyond its record, measured by hand."""

    train: float
    aggregate: float
    evaluate: float

    def per_round(self, trains: int, rounds: int) -> float:
        return trains * self.train + self.aggregate + self.evaluate + self.evaluate / rounds


class Children:
    """Child processes, each leading its own process group, so that all they started can be killed."""

    def __init__(self) -> None:
        self.live: set[subprocess.Popen] = set()

    def run(self, cmd: list[str | Path], log: Path, cwd: Path | None = None, timeout: float = 1800) -> float:
        """Run `cmd` to completion, output to `log`; its wall seconds. Raises if it fails."""
        started = time.perf_counter()
        with log.open("w") as out:
            proc = subprocess.Popen(
                [str(c) for c in cmd], stdout=out, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True
            )
            self.live.add(proc)
            try:
                rc = proc.wait(timeout=timeout)
            finally:
                self.kill(proc)
        seconds = time.perf_counter() - started
        if rc != 0:
            raise RuntimeError(
                f"{' '.join(map(str, cmd[:4]))} ... failed ({rc}), see {log}:\n{log.read_text()[-2000:]}"
            )
        return seconds

    def kill(self, proc: subprocess.Popen) -> None:
        """SIGTERM first (`xffl-cwl run` then stops StreamFlow, which runs in a session of its own), SIGKILL
        after 20 s; and SIGKILL to the group once the child is gone."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            # A runner that exited may have left tools behind in its group: they must not outlive it.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        self.live.discard(proc)

    def kill_all(self) -> None:
        for proc in list(self.live):
            self.kill(proc)


def xffl(*args: str | Path) -> list[str | Path]:
    return [sys.executable, "-m", "xffl_cwl.cli", *args]


def federation_yml(path: Path, assets: Path, rounds: int, steps: int) -> Path:
    """As tests/conftest.py's write_federation, without a test set."""
    entries = "".join(f"  - name: {f}\n    dataset: {assets / 'data' / f}\n" for f in FACILITIES)
    path.write_text(
        f"name: overhead\nrounds: {rounds}\nmodel: {assets / 'model'}\n"
        f"training:\n  local_steps: {steps}\n  seq_len: 64\n  lr: 0.003\n"
        f"aggregation:\n  strategy: fedavg\n  min_updates: {len(FACILITIES)}\nfacilities:\n{entries}"
    )
    return path


def records(root: Path, name: str) -> list[dict]:
    """Every `name` record under root (symbolic links not followed, so staged inputs are not counted twice)."""
    return [json.loads(p.read_text()) for p in root.rglob(name) if p.is_file()]


def tools_seconds(root: Path, rounds: int) -> tuple[float, float]:
    """From the records: the sum over the rounds of the slowest facility's train and the aggregation (the
    critical path), and of every train and aggregation (what a runner running one step at a time waits)."""
    trains: dict[tuple[int, str], float] = {}
    for record in records(root, "update.json"):
        trains[record["round"], record["facility"]] = record["wall_seconds"]
    aggregates = {record["round"]: record["seconds"] for record in records(root, "aggregate.json")}
    missing = [r for r in range(1, rounds + 1) if r not in aggregates or (r, FACILITIES[0]) not in trains]
    if missing:
        raise RuntimeError(f"no records of round(s) {missing} under {root}")
    critical = sum(max(trains[r, f] for f in FACILITIES) + aggregates[r] for r in range(1, rounds + 1))
    serial = sum(sum(trains[r, f] for f in FACILITIES) + aggregates[r] for r in range(1, rounds + 1))
    return critical, serial


def startup(assets: Path, work: Path, steps: int, children: Children) -> Startup:
    """What a train, an aggregate and a summary-only evaluate cost beyond their records when run by hand."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    update, model = work / "update", work / "model"
    settings = ["--seq-len", "64", "--lr", "0.003", "--local-steps", str(steps), "--no-progress"]
    data = assets / "data" / FACILITIES[0]
    cmd = xffl("train", "--model", assets / "model", "--dataset", data, "--out", update, "--facility", FACILITIES[0])
    train = children.run([*cmd, "--local-out", work / "copy", *settings], work / "train.log")
    train -= json.loads((update / "update.json").read_text())["wall_seconds"]
    cmd = xffl("aggregate", "--global", assets / "model", "--update", f"{FACILITIES[0]}={update}", "--out", model)
    aggregate = children.run([*cmd, "--change-out", work / "change", "--round", "1"], work / "aggregate.log")
    aggregate -= json.loads((model / "aggregate.json").read_text())["seconds"]
    evaluate = children.run(xffl("evaluate", "--model", model, "--out", work / "history.jsonl"), work / "evaluate.log")
    print(f"by hand, beyond the records: train {train:.1f} s, aggregate {aggregate:.1f} s, evaluate {evaluate:.1f} s")
    return Startup(train, aggregate, evaluate)


def run_once(runner: str, fed: Path, work: Path, rounds: int, children: Children, parallel: bool) -> Run:
    """Generate a fresh run folder and run it to the end with `runner`."""
    from xffl_cwl.federation import load_federation
    from xffl_cwl.generator import generate

    folder = work / "run"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    generate(load_federation(fed), folder)
    if runner == "streamflow":
        cmd = xffl("run", folder, "--no-check")
        wall = children.run(cmd, work / "runner.log")
        root = folder
    else:
        # --leave-tmpdir keeps the intermediate outputs (the records) where tools_seconds finds them, under
        # this run's folder; it only spares cwltool deleting a few small directories at the end.
        tmp = work / "cwl-tmp"
        tmp.mkdir()
        cmd = [sys.executable, "-m", "cwltool", "--enable-ext", "--no-container", "--outdir", work / "out"]
        cmd += ["--tmpdir-prefix", f"{tmp}/", "--leave-tmpdir", *(["--parallel"] if parallel else [])]
        cmd += ["main.cwl", "inputs.yml"]
        wall = children.run(cmd, work / "runner.log", cwd=folder)
        root = work
    return Run(runner, wall, *tools_seconds(root, rounds), rounds, runner == "cwltool" and not parallel)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs per runner, alternating")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="local steps per round")
    parser.add_argument("--workdir", type=Path, help="kept; demo assets there are reused")
    parser.add_argument(
        "--cwltool-parallel", action="store_true", help="cwltool --parallel (by default it runs one step at a time)"
    )
    args = parser.parse_args()
    if args.repeats < 1 or args.rounds < 1 or args.steps < 1:
        parser.error("--repeats, --rounds and --steps must be positive")

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup below, as Ctrl-C does
    work = args.workdir or Path(tempfile.mkdtemp(prefix="round-overhead-"))
    work.mkdir(parents=True, exist_ok=True)
    children = Children()
    try:
        assets = work / "assets"
        if not (assets / "assets.json").exists():
            shutil.rmtree(assets, ignore_errors=True)
            children.run(xffl("demo-assets", "--out", assets, "--facilities", "2"), work / "demo-assets.log")
        fed = federation_yml(work / "federation.yml", assets, args.rounds, args.steps)
        by_hand = startup(assets, work / "by-hand", args.steps, children)
        cwltool = "cwltool --parallel" if args.cwltool_parallel else "cwltool (one step at a time)"
        print(
            f"{args.rounds} rounds of {len(FACILITIES)} local facilities, {args.steps} steps, no test set; {cwltool}\n"
        )
        print(f"{'run':<14} {'wall s':>7} {'tools s':>8} {'serial s':>9} {'overhead s/round':>17} {'own s/round':>12}")
        runs: list[Run] = []
        for i in range(args.repeats):
            order = RUNNERS if i % 2 == 0 else RUNNERS[::-1]
            for runner in order:
                run = run_once(runner, fed, work / f"{runner}-{i + 1}", args.rounds, children, args.cwltool_parallel)
                runs.append(run)
                print(
                    f"{runner + ' ' + str(i + 1):<14} {run.wall:>7.1f} {run.tools:>8.1f} {run.serial:>9.1f} "
                    f"{run.overhead:>17.1f} {run.own(by_hand):>12.1f}",
                    flush=True,
                )
        print()
        overhead, own = {}, {}
        for runner in RUNNERS:
            mine = [r for r in runs if r.runner == runner]
            overhead[runner] = statistics.median(r.overhead for r in mine)
            own[runner] = statistics.median(r.own(by_hand) for r in mine)
            print(
                f"median {runner:<11} wall {statistics.median(r.wall for r in mine):6.1f} s, "
                f"overhead {overhead[runner]:5.1f} s/round, own {own[runner]:5.1f} s/round"
            )
        for what, medians in (("overhead", overhead), ("own", own)):
            ratio = f"{medians['streamflow'] / medians['cwltool']:.2f}" if medians["cwltool"] > 0 else "-"
            print(f"{what} streamflow / cwltool: {ratio}")
    finally:
        children.kill_all()
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
