"""Memory and speed of `xffl-cwl train` on one process and sharded over two (FSDP2, gloo, CPU).

Builds a ~400 MB (fp32) LLaMA-architecture model and a synthetic dataset, then alternates two
commands with the same global batch: A, one process (micro-batch 2B), and B, two workers
(micro-batch B each). For each run it prints the peak RSS of every process that trained (A: the
process's own, read with os.wait4 through a small launcher; B: each worker's own figure, which it
logs), the most memory that writing the update added on any rank, and the tokens/s of update.json;
then medians and the ratio B/A. Full fine-tuning with AdamW holds weights, gradients and two
optimizer moments (4x the model); sharded over 2, each worker should hold about half of that.

    python benchmarks/sharded_training.py [--preset bench-400mb] [--repeats 2] [--steps 3] [--mode full]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from aggregate_memory import LAUNCHER  # measures a command's own peak RSS (os.wait4)

PEAK = re.compile(r"worker (\d+) of \d+: peak RSS (\d+) MiB")
WRITE = re.compile(r"writing the update took at most (\d+) MiB more memory")


def run(model: Path, dataset: Path, out: Path, workers: int, batch: int, steps: int, mode: str) -> dict:
    command = [
        sys.executable, "-m", "xffl_cwl.cli", "train", "--model", str(model), "--dataset", str(dataset),
        "--out", str(out), "--facility", "bench", "--local-steps", str(steps), "--batch-size", str(batch // workers),
        "--seq-len", "128", "--mode", mode, "--no-progress", "--nproc-per-node", str(workers),
    ]  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", LAUNCHER, *command], capture_output=True, text=True, check=True)
    code, own_peak = proc.stdout.split()
    if int(code) != 0:
        raise SystemExit(f"training failed:\n{proc.stderr[-3000:]}")
    peaks = [int(m[2]) for m in PEAK.finditer(proc.stderr)] if workers > 1 else [int(own_peak) // 2**20]
    writes = [int(m[1]) for m in WRITE.finditer(proc.stderr)]
    record = json.loads((out / "update.json").read_text())
    return {"peak_mib": max(peaks), "write_mib": max(writes or [0]), "tokens_per_s": record["tokens_per_second"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="bench-400mb")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4, help="global micro-batch")
    parser.add_argument("--mode", default="full", choices=["full", "lora"])
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()

    from xffl_cwl.learning.demo_assets import facility_names, make_demo_assets

    work = Path(args.workdir or tempfile.mkdtemp(prefix="xffl-sharded-"))
    assets_dir = work / "assets"
    if not (assets_dir / "assets.json").exists():
        make_demo_assets(
            assets_dir, facility_names(1), samples_per_facility=400, test_samples_per_task=10, preset=args.preset
        )
    model, dataset = assets_dir / "model", next((assets_dir / "data").iterdir())
    size_mib = sum(f.stat().st_size for f in model.glob("*.safetensors")) / 2**20
    print(f"model {size_mib:.0f} MiB (fp32), mode {args.mode}, global micro-batch {args.batch}, {args.steps} steps")
    results: dict[str, list[dict]] = {"A: 1 process": [], "B: 2 workers": []}
    for i in range(args.repeats):
        for label, workers in (("A: 1 process", 1), ("B: 2 workers", 2)):
            out = work / f"out-{workers}-{i}"
            r = run(model, dataset, out, workers, args.batch, args.steps, args.mode)
            subprocess.run(["rm", "-rf", str(out)], check=True)
            results[label].append(r)
            print(
                f"{label}: peak RSS per process {r['peak_mib']} MiB, writing the update +{r['write_mib']} MiB, "
                f"{r['tokens_per_s']:.0f} tokens/s",
                flush=True,
            )
    med = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in results.items()}
    a, b = med["A: 1 process"], med["B: 2 workers"]
    print(
        f"median peak RSS per process: A {a['peak_mib']:.0f} MiB, B {b['peak_mib']:.0f} MiB, "
        f"ratio B/A {b['peak_mib'] / a['peak_mib']:.2f}; writing the update: at most +{b['write_mib']:.0f} MiB "
        f"per worker ({b['write_mib'] / size_mib:.2f} of the model); tokens/s A {a['tokens_per_s']:.0f}, "
        f"B {b['tokens_per_s']:.0f} (ratio {b['tokens_per_s'] / a['tokens_per_s']:.2f}, 2 workers on the same cores)"
    )


if __name__ == "__main__":
    main()
