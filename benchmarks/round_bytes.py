"""What a federated round moves per facility, per transfer mode, and what the compression costs in quality.

    python benchmarks/round_bytes.py [--rounds 3] [--steps 20] [--modes full-whole,full-int8,...]
        [--facilities 2] [--preset tiny|small] [--workdir DIR | --assets DIR] [--jobs 2] [--no-eval]

Runs the same small federation (demo assets, facilities leonardo and lumi, fedavg, seed 0) once per
mode by driving `xffl-cwl train`, `aggregate` and `evaluate` in subprocesses, as the generated workflow
does, and counts the bytes each train step receives and sends:

- down: what the train step gets besides its own copy of the previous global model: in round 1 (and
  always in `full-whole`, today's baseline without copies) the global model's weight files, adapter
  included; later the aggregator's change directory (every file).
- up: the update directory's weight files plus update.json (and a LoRA update's adapter_config.json);
  the config and tokenizer files a full update carries along are left out, the aggregator never reads
  them (it takes its own from --global), so no transfer needs them.

The final model of each mode is evaluated on data/test.jsonl. Prints one row per mode and PASS/MISS for
the targets: a LoRA round after the first moves <= 2% of a full-whole round's bytes, a full int8 round
after the first <= 30%, and the int8 and bf16 held-out losses are within 1% of full-fp32 (exact change).
Byte ratios depend on the model's shapes only, not on the training length, so --steps 1 --no-eval is
enough to read them at --preset small. The LoRA target is out of reach of the tiny preset by
construction: its rank-8 adapter alone is 3% of the model (at small, 1%); an exact-LoRA change carries
every facility's factors, so it grows with their number. lora-exact-int8 is not run by default: the
aggregator sends exact-LoRA factors in fp32 whatever --downlink says (the change column shows it).
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
import threading
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

MB = 1e6
FACILITIES = ("leonardo", "lumi", "meluxina")
TARGET_LORA_FRACTION = 0.02
TARGET_INT8_FRACTION = 0.30
TARGET_LOSS_FRACTION = 0.01
UPDATE_EXTRA_FILES = ("update.json", "adapter_config.json")


@dataclass(frozen=True)
class Mode:
    """One way of running the federation: the train and aggregate options, and whether facilities keep copies."""

    name: str
    label: str
    train: tuple[str, ...]
    aggregate: tuple[str, ...]
    copies: bool = True


MODES: dict[str, Mode] = {
    m.name: m
    for m in (
        Mode("full-whole", "(a) full, whole model", (), ("--downlink", "fp32"), copies=False),
        Mode("full-fp32", "(b) full fp32, copies", ("--uplink", "fp32"), ("--downlink", "fp32")),
        Mode("full-bf16", "(c) full bf16", ("--uplink", "bf16"), ("--downlink", "bf16")),
        Mode("full-int8", "(d) full int8", ("--uplink", "int8"), ("--downlink", "int8")),
        Mode(
            "lora-exact",
            "(e) LoRA exact",
            ("--mode", "lora", "--lora-r", "8"),
            ("--lora-merge", "exact", "--downlink", "fp32"),
        ),
        Mode(
            "lora-exact-int8",
            "(e) LoRA exact, int8 down",
            ("--mode", "lora", "--lora-r", "8"),
            ("--lora-merge", "exact", "--downlink", "int8"),
        ),
        Mode("fedit", "(f) LoRA FedIT", ("--mode", "lora", "--lora-r", "8"), ("--lora-merge", "fedit")),
    )
}


# The aggregator sends an exact-LoRA change as the facilities' low-rank factors, in fp32 whatever --downlink
# says: lora-exact-int8 is then the same run as lora-exact, so it is left out unless asked for.
DEFAULT_MODES = tuple(m for m in MODES if m != "lora-exact-int8")


@dataclass
class Result:
    """Bytes per round (mean over the facilities) and the final held-out loss of one mode."""

    down: list[float] = field(default_factory=list)
    up: list[float] = field(default_factory=list)
    loss: float | None = None
    fingerprint: str = ""
    change: str = "-"
    seconds: float = 0.0


class Runner:
    """Runs CLI commands at most `jobs` at a time, each in its own process group, all killed on abort."""

    def __init__(self, jobs: int) -> None:
        self.slots = threading.Semaphore(jobs)
        self.live: set[subprocess.Popen] = set()
        self.lock = threading.Lock()
        self.aborted = threading.Event()
        # Two trainings on two cores must not each start a thread per core.
        self.env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, _cores() // jobs)))}

    def cli(self, *args: str | Path, log: Path) -> None:
        """`xffl-cwl ARGS`, its output to `log`; raises if it fails or the run was aborted."""
        with self.slots:
            if self.aborted.is_set():
                raise RuntimeError("aborted")
            with log.open("w") as out:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "xffl_cwl.cli", *map(str, args)],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=self.env,
                    start_new_session=True,
                )
                with self.lock:
                    self.live.add(proc)
                    late = self.aborted.is_set()  # kill_all may have run between the check above and Popen
                if late:
                    os.killpg(proc.pid, signal.SIGKILL)
                try:
                    rc = proc.wait()
                finally:
                    with self.lock:
                        self.live.discard(proc)
        if rc != 0:
            # One failed step fails the benchmark: stop the others now rather than after their rounds.
            self.kill_all()
            tail = log.read_text()[-2000:]
            raise RuntimeError(f"xffl-cwl {args[0]} failed ({rc}), see {log}:\n{tail}")

    def kill_all(self) -> None:
        """SIGKILL every running child and whatever it started."""
        self.aborted.set()
        with self.lock:
            procs = list(self.live)
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        for proc in procs:
            proc.wait()


def _cores() -> int:
    return len(os.sched_getaffinity(0))


def _files(directory: Path) -> Iterator[Path]:
    return (p for p in directory.rglob("*") if p.is_file())


def weight_bytes(model: Path) -> int:
    """The weight files a facility without a copy must receive: the model's and its global adapter's."""
    files = [*model.glob("*.safetensors"), *(model / "adapter").glob("*.safetensors")]
    return sum(p.stat().st_size for p in files)


def change_bytes(change: Path) -> int:
    """Everything in the aggregator's change directory."""
    return sum(p.stat().st_size for p in _files(change))


def update_bytes(update: Path) -> int:
    """The update's weights and records, without the config and tokenizer copies nobody reads."""
    return sum(p.stat().st_size for p in _files(update) if p.suffix == ".safetensors" or p.name in UPDATE_EXTRA_FILES)


def run_mode(mode: Mode, assets: Path, work: Path, args: argparse.Namespace, runner: Runner) -> Result:
    """The federation in one mode, every round; returns its bytes and final loss."""
    started = time.perf_counter()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    facilities = FACILITIES[: args.facilities]
    settings = ["--seq-len", "64", "--batch-size", "8", "--lr", "3e-3", "--seed", "0", "--no-progress"]
    settings += ["--local-steps", str(args.steps)]
    result = Result()
    current, change, state = assets / "model", None, None
    copies: dict[str, Path] = {}

    def train(facility: str, r: int) -> tuple[int, int]:
        update = work / f"r{r}" / f"update-{facility}"
        cmd: list[str | Path] = ["train", "--dataset", assets / "data" / facility, "--out", update]
        cmd += ["--facility", facility, "--round", str(r), *settings, *mode.train]
        if not mode.copies:
            cmd += ["--model", current]
            down = weight_bytes(current)
        else:
            copy = work / f"r{r}" / f"copy-{facility}"
            if change is None:
                cmd += ["--model", current, "--local-out", copy]
                down = weight_bytes(current)
            else:
                cmd += ["--model", copies[facility], "--change", change, "--local-out", copy]
                down = change_bytes(change)
            copies[facility] = copy
        runner.cli(*cmd, log=work / f"r{r}" / f"train-{facility}.log")
        return down, update_bytes(update)

    with ThreadPoolExecutor(len(facilities)) as pool:
        for r in range(1, args.rounds + 1):
            (work / f"r{r}").mkdir()
            sizes = list(pool.map(lambda f, r=r: train(f, r), facilities))
            result.down.append(statistics.mean(d for d, _ in sizes))
            result.up.append(statistics.mean(u for _, u in sizes))
            nxt = work / f"r{r}" / "global"
            cmd: list[str | Path] = ["aggregate", "--global", current, "--out", nxt, "--round", str(r)]
            cmd += [a for f in facilities for a in ("--update", f"{f}={work / f'r{r}' / f'update-{f}'}")]
            cmd += ["--strategy", "fedavg", *mode.aggregate]
            if mode.copies and r < args.rounds:
                cmd += ["--change-out", work / f"r{r}" / "change"]
            if state is not None:
                cmd += ["--state", state]
            runner.cli(*cmd, log=work / f"r{r}" / "aggregate.log")
            record = json.loads((nxt / "aggregate.json").read_text())
            if mode.copies and r < args.rounds:
                change = work / f"r{r}" / "change"
                assert record["change"]["bytes"] == change_bytes(change), (record["change"], change_bytes(change))
                result.change = f"{record['change']['kind']}/{record['change']['encoding']}"
            state = nxt / "state" if (nxt / "state").is_dir() else None
            current = nxt
    result.fingerprint = record["fingerprint"]
    if not args.no_eval:
        result.loss = evaluate(current, assets, work, args.rounds, runner)
    result.seconds = time.perf_counter() - started
    return result


def evaluate(model: Path, assets: Path, work: Path, round_number: int, runner: Runner) -> float:
    """Held-out loss of `model` on the demo's mixed test set."""
    history = work / "history.jsonl"
    history.unlink(missing_ok=True)
    cmd: list[str | Path] = ["evaluate", "--model", model, "--dataset", assets / "data" / "test.jsonl"]
    cmd += ["--out", history, "--round", str(round_number), "--seq-len", "64", "--batch-size", "8"]
    runner.cli(*cmd, log=work / "evaluate.log")
    return json.loads(history.read_text().splitlines()[-1])["eval_loss"]


def later(values: list[float]) -> float:
    """Mean over the rounds after the first (the first when there is only one)."""
    return statistics.mean(values[1:] or values)


def report(results: dict[str, Result], initial: float | None, args: argparse.Namespace) -> None:
    """The table, then PASS/MISS per target that the chosen modes allow judging."""
    base = results.get("full-whole")
    base_round = later(base.down) + later(base.up) if base else None
    base_total = sum(base.down) + sum(base.up) if base else None
    ref_name = "full-fp32" if "full-fp32" in results else "full-whole"
    ref = results.get(ref_name)
    ref_loss = ref.loss if ref else None
    print(
        f"\n{args.rounds} rounds, {args.steps} local steps, {args.facilities} facilities, preset {args.preset}, "
        f"fedavg; MB = 1e6 bytes, per facility (mean); ratios against full-whole"
        + (f"; initial held-out loss {initial:.4f}" if initial is not None else "")
    )
    head = (
        f"{'mode':<16} {'down r1':>9} {'down r2+':>9} {'up/round':>9} {'total':>9} "
        f"{'round/a':>8} {'total/a':>8} {'loss':>8} {'vs ' + ref_name:>14}"
    )
    print(head)
    print("-" * len(head))
    for name, res in results.items():
        round_bytes = later(res.down) + later(res.up)
        total = sum(res.down) + sum(res.up)
        loss = f"{res.loss:.4f}" if res.loss is not None else "-"
        vs = f"{(res.loss - ref_loss) / ref_loss:+.2%}" if res.loss is not None and ref_loss else "-"
        print(
            f"{name:<16} {res.down[0] / MB:>9.4f} {later(res.down) / MB:>9.4f} {statistics.mean(res.up) / MB:>9.4f} "
            f"{total / MB:>9.4f} {_ratio(round_bytes, base_round):>8} {_ratio(total, base_total):>8} {loss:>8} {vs:>14}"
        )
    print()
    for name, res in results.items():
        print(
            f"  {name:<16} {MODES[name].label + ':':<28} change {res.change:<14} final model {res.fingerprint[:19]}, "
            f"{res.seconds:.0f} s"
        )
    if "full-whole" in results and "full-fp32" in results:
        same = results["full-whole"].fingerprint == results["full-fp32"].fingerprint
        print(f"check full-fp32 (copy + change) ends on full-whole's exact model: {'PASS' if same else 'MISS'}")
    if base_round:
        for name in ("lora-exact", "lora-exact-int8", "fedit"):
            if name in results:
                frac = (later(results[name].down) + later(results[name].up)) / base_round
                verdict = _verdict(frac <= TARGET_LORA_FRACTION)
                print(
                    f"target {name} round 2+ bytes / full-whole round <= {TARGET_LORA_FRACTION:.0%}: {frac:.2%} {verdict}"
                )
        if "full-int8" in results:
            res = results["full-int8"]
            frac = (later(res.down) + later(res.up)) / base_round
            verdict = _verdict(frac <= TARGET_INT8_FRACTION)
            print(
                f"target full-int8 round 2+ bytes / full-whole round <= {TARGET_INT8_FRACTION:.0%}: {frac:.2%} {verdict}"
            )
    if ref_loss:
        for name in ("full-bf16", "full-int8"):
            if name in results and results[name].loss is not None:
                diff = abs(results[name].loss - ref_loss) / ref_loss
                verdict = _verdict(diff <= TARGET_LOSS_FRACTION)
                print(f"target {name} loss within {TARGET_LOSS_FRACTION:.0%} of {ref_name}: {diff:.2%} {verdict}")


def _ratio(value: float, base: float | None) -> str:
    return f"{value / base:.2%}" if base else "-"


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="local steps per round")
    parser.add_argument("--modes", default=",".join(DEFAULT_MODES), help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--facilities", type=int, default=2, choices=(1, 2, 3))
    parser.add_argument("--preset", default="tiny", choices=("tiny", "small"))
    parser.add_argument("--workdir", type=Path, help="kept; demo assets there are reused, mode runs redone")
    parser.add_argument("--assets", type=Path, help="existing `xffl-cwl demo-assets` output to use")
    parser.add_argument("--jobs", type=int, default=2, help="CLI processes at a time")
    parser.add_argument("--no-eval", action="store_true", help="skip the held-out losses")
    args = parser.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        parser.error(f"unknown modes {unknown}; choose from {', '.join(MODES)}")
    if args.rounds < 1 or args.steps < 1:
        parser.error("--rounds and --steps must be positive")

    # SIGTERM (a test's timeout, a CI cancel) must run the cleanup below like Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = args.workdir or Path(tempfile.mkdtemp(prefix="round-bytes-"))
    work.mkdir(parents=True, exist_ok=True)
    runner = Runner(args.jobs)
    started = time.perf_counter()
    try:
        assets = args.assets or work / "assets"
        if args.assets is None and not (assets / "assets.json").exists():
            shutil.rmtree(assets, ignore_errors=True)
            runner.cli(
                "demo-assets",
                "--out",
                assets,
                "--facilities",
                str(args.facilities),
                "--preset",
                args.preset,
                log=work / "demo-assets.log",
            )
        elif args.assets is None and json.loads((assets / "assets.json").read_text()).get("preset") != args.preset:
            sys.exit(f"{assets} holds another preset's model; remove it or pick that preset")
        futures: dict[str, Future] = {}
        with ThreadPoolExecutor(len(modes) + 1) as pool:
            try:
                futures = {m: pool.submit(run_mode, MODES[m], assets, work / m, args, runner) for m in modes}
                if not args.no_eval:
                    (work / "initial").mkdir(exist_ok=True)
                    futures["initial"] = pool.submit(evaluate, assets / "model", assets, work / "initial", 0, runner)
                done, _ = wait(futures.values(), return_when=FIRST_EXCEPTION)
                for future in done:
                    if future.exception() is not None:
                        raise future.exception()
            finally:
                # Before the pool's exit waits for its threads: they end once their processes are killed.
                if not all(f.done() for f in futures.values()):
                    runner.kill_all()
        initial = futures.pop("initial").result() if not args.no_eval else None
        report({m: f.result() for m, f in futures.items()}, initial, args)
        kept = f", work kept in {work}" if args.workdir else ""
        print(f"\nwall {time.perf_counter() - started:.0f} s{kept}")
    finally:
        runner.kill_all()
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
