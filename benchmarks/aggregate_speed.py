"""Aggregation speed on valid updates: this checkout against another one (an earlier commit), alternating.

    git worktree add /tmp/xffl-ref <commit>
    python benchmarks/aggregate_speed.py --reference /tmp/xffl-ref [--updates 8] [--repeats 5]

Both aggregate the same ~400 MB model with the same N full updates (fedavg), in fresh processes,
runs alternating so that a noisy machine hurts both alike; prints each run, the medians and the
ratio current / reference (below 1: faster now).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from aggregate_memory import make_update

from xffl_cwl.learning.demo_assets import save_model
from xffl_cwl.learning.model_dir import fingerprint

# Runs `xffl-cwl` from the checkout at argv[1], whatever the installed (editable) package is.
_FROM_CHECKOUT = """
import sys
checkout = sys.argv.pop(1)
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")]
sys.path.insert(0, checkout)
from xffl_cwl.cli import main
sys.argv[0] = "xffl-cwl"
main()
"""


def timed(checkout: Path, args: list[str]) -> float:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _FROM_CHECKOUT, str(checkout), *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{checkout}: aggregate failed: {proc.stderr[-2000:]}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, required=True, help="another checkout of xffl-cwl")
    parser.add_argument("--updates", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--preset", default="bench-400mb")
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()
    current = Path(__file__).resolve().parent.parent
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="xffl-speed-"))
    global_dir = workdir / "global"
    if not global_dir.exists():
        save_model(global_dir, args.preset)
    fp = fingerprint(global_dir)
    updates = [workdir / f"facility{i}" for i in range(args.updates)]
    for i, path in enumerate(updates):
        if not path.exists():
            make_update(global_dir, path, path.name, i, fp)
    times: dict[str, list[float]] = {"reference": [], "current": []}
    for repeat in range(args.repeats):
        for label, checkout in (("reference", args.reference), ("current", current)):
            out = workdir / f"out-{label}"
            shutil.rmtree(out, ignore_errors=True)
            aggregate = ["aggregate", "--global", str(global_dir), "--out", str(out)]
            seconds = timed(checkout, aggregate + [a for u in updates for a in ("--update", str(u))])
            times[label].append(seconds)
            print(f"run {repeat + 1} {label}: {seconds:.2f} s", flush=True)
    ref, cur = statistics.median(times["reference"]), statistics.median(times["current"])
    total = sum(p.stat().st_size for u in updates for p in u.glob("*.safetensors"))
    print(f"{args.updates} updates, {total / 1e9:.2f} GB of update weights")
    print(
        f"median reference {ref:.2f} s ({total / ref / 1e9:.2f} GB/s), current {cur:.2f} s ({total / cur / 1e9:.2f} GB/s)"
    )
    print(f"ratio current/reference: {cur / ref:.3f}")
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
