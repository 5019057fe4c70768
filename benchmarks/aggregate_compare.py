"""The issue's aggregation targets, measured: `xffl-cwl aggregate` against the xFFL example's aggregator and a naive mean.

    python benchmarks/aggregate_compare.py [--updates 2 8] [--repeats 3] [--hog] [--check] [--preset bench-400mb] [--workdir DIR]

Builds a model (default ~400 MB fp32) and N noisy full updates of it (or reuses them under --workdir),
then, in every repeat and for every N, runs one after the other, each in a fresh process whose own
peak RSS the kernel reports: `xffl-cwl aggregate` (fedavg, default options), the xFFL example's
aggregator (benchmarks/xffl_reference_aggregator.py), a naive load-all mean
(benchmarks/naive_mean_aggregator.py) and a bare `import torch` (the memory baseline); with --hog,
`xffl-cwl aggregate` once more while one busy process per core competes for the CPUs. Runs
alternate, so a noisy, shared machine slows all of them alike; every figure is a median over the
repeats, and every ratio the median of the ratios of runs side by side in one repeat. Prints each run,
a table, and PASS/MISS for each target (judged at the largest N); --check also compares the outputs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from aggregate_memory import LAUNCHER, make_update

BENCH = Path(__file__).resolve().parent
MIB = 1024 * 1024

# The targets: update bytes per second of the whole process, speed against the xFFL example
# and a naive mean, memory over a bare `import torch` (and how much it may grow from the smallest N to
# the largest), and the slowdown a CPU hog may cause.
TARGET_GBPS = 1.5
TARGET_XFFL_RATIO = 3.0
TARGET_NAIVE_RATIO = 1.3
TARGET_PEAK_FRACTION = 0.2
TARGET_FLAT_FRACTION = 0.05
TARGET_HOG_RATIO = 1.5

AGGREGATORS = ("ours", "xffl", "naive")


@dataclass
class Runs:
    """Seconds and peak RSS (bytes) of one kind of run, one entry per repeat."""

    seconds: list[float] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL a child and everything it started: each child leads its own process group."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def measure(cmd: list[str]) -> tuple[float, int]:
    """(seconds, peak RSS in bytes) of one command, in a fresh process measured alone.

    Uses aggregate_memory's LAUNCHER (a small interpreter, so that the figure is the command's own,
    not this large process's) in a process group of its own, killed whole if we are interrupted.
    """
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, *cmd],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate()
    finally:
        kill_group(proc)
    seconds = time.perf_counter() - started
    code, rss = (int(v) for v in out.split())
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd[:5])} ... failed ({code}):\n{err[-3000:]}")
    return seconds, rss


class Hog:
    """Busy Python processes while the block runs; always killed when it ends."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> Hog:
        for _ in range(self.count):
            self.procs.append(subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True))
        if self.procs:
            time.sleep(0.3)  # past their start-up, spinning
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            kill_group(proc)
        self.procs.clear()


def weight_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def command(kind: str, global_dir: Path, updates: list[Path], out: Path) -> list[str]:
    """The command line of one aggregator, all reading the same directories and writing to `out`."""
    if kind.startswith("ours"):
        cmd = [sys.executable, "-m", "xffl_cwl.cli", "aggregate", "--global", str(global_dir), "--out", str(out)]
        return cmd + [a for u in updates for a in ("--update", str(u))]
    script = BENCH / {"xffl": "xffl_reference_aggregator.py", "naive": "naive_mean_aggregator.py"}[kind]
    return [sys.executable, str(script), str(global_dir), *map(str, updates), "--out", str(out)]


def check_outputs(out: Path) -> list[str]:
    """Ours (fedavg) equals the naive weighted mean; the xFFL one differs by design but is a whole model."""
    import torch
    from xffl_reference_aggregator import load_whole

    ours, naive, xffl = (load_whole(out / kind) for kind in ("ours", "naive", "xffl"))
    if set(ours) == set(naive):
        worst = max((ours[k].float() - naive[k].float()).abs().max().item() for k in naive)
        line = f"same {len(naive)} tensors, max |diff| {worst:.1e} (<= 1e-6) {verdict(worst <= 1e-6)}"
    else:
        line = f"tensor names differ {verdict(False)}"
    whole = set(xffl) == set(naive) and all(t.dtype == torch.bfloat16 and t.isfinite().all() for t in xffl.values())
    return [
        f"check ours vs naive mean: {line}",
        f"check xffl: {len(xffl)} finite bf16 tensors named as the global's {verdict(whole)}",
    ]


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def target(label: str, value: float | None, op: str, goal: float, missing: str = "") -> str:
    """One target line: figure, goal and PASS/MISS, or why it was not measured."""
    if value is None:
        return f"  {label:44} {'-':>6}  (not measured: {missing})"
    ok = {">=": value >= goal, "<=": value <= goal, "<": value < goal}[op]
    return f"  {label:44} {value:6.2f}  {op} {goal:<4}  {verdict(ok)}"


def run(args: argparse.Namespace, workdir: Path) -> None:
    global_dir = workdir / "global"
    if not global_dir.exists():
        from xffl_cwl.learning.demo_assets import save_model

        save_model(global_dir, args.preset)
    from xffl_cwl.learning.model_dir import fingerprint

    base_fp = fingerprint(global_dir)
    all_updates = [workdir / f"facility{i}" for i in range(max(args.updates))]
    for i, path in enumerate(all_updates):
        if not path.exists():
            make_update(global_dir, path, path.name, i, base_fp)
    model = weight_bytes(global_dir)
    cores = os.cpu_count() or 1
    top = max(args.updates)
    print(
        f"model {model / 1e6:.0f} MB ({args.preset}); updates {args.updates}; {args.repeats} repeat(s); {cores} cores"
    )

    bare: Runs = Runs()
    runs: dict[tuple[int, str], Runs] = {(n, k): Runs() for n in args.updates for k in (*AGGREGATORS, "ours+hog")}
    checks: list[str] = []
    out = workdir / "out"
    for repeat in range(1, args.repeats + 1):
        seconds, rss = measure([sys.executable, "-c", "import torch"])
        bare.seconds.append(seconds)
        bare.rss.append(rss)
        print(f"repeat {repeat}: bare 'import torch' {seconds:5.2f} s, peak {rss / MIB:6.0f} MiB", flush=True)
        for n in args.updates:
            shutil.rmtree(out, ignore_errors=True)  # a run interrupted earlier in this --workdir
            kinds = list(AGGREGATORS)
            if args.hog and n == top:  # right after the quiet run, with the updates in the page cache as it had them
                kinds.insert(kinds.index("ours") + 1, "ours+hog")
            for kind in kinds:
                cmd = command(kind, global_dir, all_updates[:n], out / kind)
                with Hog(args.hog if kind == "ours+hog" else 0):
                    seconds, rss = measure(cmd)
                runs[n, kind].seconds.append(seconds)
                runs[n, kind].rss.append(rss)
                print(f"repeat {repeat}: N={n:<2} {kind:9} {seconds:6.2f} s, peak {rss / MIB:6.0f} MiB", flush=True)
            if args.check and repeat == 1:
                checks += [f"N={n} {line}" for line in check_outputs(out)]
            shutil.rmtree(out, ignore_errors=True)

    base_rss = statistics.median(bare.rss)
    print()
    # Peak RSS also over a bare `import torch`: the target's baseline (negative for a torch-free process).
    print(f"{'N':>2}  {'aggregator':10} {'median s':>8} {'GB/s':>6} {'peak MiB':>8} {'-torch MiB':>10} {'/model':>6}")
    for n in args.updates:
        update_bytes = sum(weight_bytes(u) for u in all_updates[:n])
        for kind in (*AGGREGATORS, "ours+hog"):
            r = runs[n, kind]
            if not r.seconds:
                continue
            sec, peak = statistics.median(r.seconds), statistics.median(r.rss)
            over = peak - base_rss
            figures = (
                f"{sec:8.2f} {update_bytes / sec / 1e9:6.2f} {peak / MIB:8.0f} {over / MIB:10.0f} {over / model:6.2f}"
            )
            print(f"{n:>2}  {kind:10} {figures}")
    print(f"bare 'import torch' peak {base_rss / MIB:.0f} MiB")
    for line in checks:
        print(line)

    def paired(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(runs[top, a].seconds, runs[top, b].seconds, strict=True))

    top_bytes = sum(weight_bytes(u) for u in all_updates[:top])
    gbps = top_bytes / statistics.median(runs[top, "ours"].seconds) / 1e9
    peak = max(statistics.median(runs[n, "ours"].rss) for n in args.updates) - base_rss
    print()
    print(f"targets at N={top}:")
    print(target("ours GB/s of update bytes, whole process", gbps, ">=", TARGET_GBPS))
    print(target("xffl time / ours time", paired("xffl", "ours"), ">=", TARGET_XFFL_RATIO))
    print(target("ours time / naive mean time", paired("ours", "naive"), "<=", TARGET_NAIVE_RATIO))
    print(target("ours peak over bare torch / model size", peak / model, "<", TARGET_PEAK_FRACTION))
    low = min(args.updates)
    grow = (statistics.median(runs[top, "ours"].rss) - statistics.median(runs[low, "ours"].rss)) / model
    growth = f"ours peak growth N={low}->{top} / model size"
    print(target(growth, grow if low < top else None, "<", TARGET_FLAT_FRACTION, "give two --updates counts"))
    hogged = paired("ours+hog", "ours") if args.hog else None
    print(target("ours hogged time / quiet time", hogged, "<=", TARGET_HOG_RATIO, "add --hog"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--updates", type=int, nargs="+", default=[8], help="update counts N to run (targets at the largest)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--preset", default="bench-400mb", help="model preset of xffl_cwl.learning.demo_assets")
    parser.add_argument(
        "--hog",
        type=int,
        nargs="?",
        const=1,
        default=0,
        help="also time ours while HOG busy processes run (default 1: a concurrent CPU hog; 2 here is one per core)",
    )
    parser.add_argument("--check", action="store_true", help="compare the aggregators' outputs (first repeat)")
    parser.add_argument("--workdir", type=Path, help="build (or reuse) the models here and keep them")
    args = parser.parse_args()
    if min(args.updates) < 1 or args.repeats < 1:
        parser.error("--updates counts and --repeats must be at least 1")
    args.updates = sorted(set(args.updates))
    # Ctrl-C (even where a shell started us with SIGINT ignored) and SIGTERM unwind through the
    # finally blocks, so that every child is killed and the workdir removed.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="xffl-compare-"))
    try:
        run(args, workdir)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
