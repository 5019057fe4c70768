"""Peak memory of `xffl-cwl aggregate` as the number of updates grows, with hostile updates in the mix.

Builds a ~400 MB (fp32) LLaMA-architecture model and N noisy full updates of it, plus hostile ones
(by default: one whose last tensor ends in a NaN, found only while merging, so the round is
written twice; one with a 39 MB header), runs the real CLI in a subprocess, and reads that
process's own peak RSS (os.wait4). Prints one line per run:

    python benchmarks/aggregate_memory.py [--workdir DIR] [--updates 2 8] [--hostile 2] [--preset bench-400mb]
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from xffl_cwl.learning.demo_assets import save_model
from xffl_cwl.learning.model_dir import copy_side_files, fingerprint
from xffl_cwl.learning.safetensors_stream import ShardWriter, TensorReader, read_checkpoint, row_chunks, specs_of

# A fresh, small interpreter starts the measured command: Linux carries the peak RSS of the
# address space a child was forked from into the child's own figure, so forking it from this
# (large) process would report our memory, not its own.
LAUNCHER = """
import os, subprocess, sys
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
err = proc.stderr.read()
_, status, usage = os.wait4(proc.pid, 0)
sys.stderr.buffer.write(err[-20000:])
print(os.waitstatus_to_exitcode(status), usage.ru_maxrss * 1024)
"""


def peak_rss(cmd: list[str]) -> tuple[int, float]:
    """(peak RSS in bytes, seconds) of one command, measured by the kernel for that process alone."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", LAUNCHER, *cmd], capture_output=True, text=True)
    code, rss = (int(v) for v in proc.stdout.split())
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({code}): {proc.stderr[-2000:]}")
    return rss, time.perf_counter() - started


def make_update(global_dir: Path, out: Path, facility: str, seed: int, base_fp: str) -> None:
    """A full update written chunk by chunk: global + small noise, never a whole model in memory."""
    ckpt = read_checkpoint(global_dir)
    out.mkdir(parents=True)
    gen = np.random.default_rng(seed)
    with TensorReader() as reader:
        for shard in ckpt.shards:
            writer = ShardWriter(out / shard.relpath, specs_of(shard.entries), shard.metadata)
            for entry in shard.entries:
                for start, count in row_chunks(entry.shape, 1 << 22):
                    chunk = reader.read(entry, start, count)
                    writer.write(entry.name, chunk + np.float32(1e-3) * gen.standard_normal(count, dtype=np.float32))
            writer.close()
    copy_side_files(global_dir, out)
    record = {
        "format": "xffl-update",
        "version": 1,
        "facility": facility,
        "round": 1,
        "mode": "full",
        "samples": 100 + seed,
        "tokens": 1000,
        "steps": 1,
        "base_fingerprint": base_fp,
        "train_loss": {"first": 2.0, "last": 1.0, "mean": 1.5},
        "eval_loss": {"before": 2.0, "after": 1.0},
    }
    (out / "update.json").write_text(json.dumps(record))


def make_hostile(honest: Path, out: Path, kind: str) -> None:
    """A copy of an honest update, spoiled: `nan` (the very last value) or `header` (39 MB of padding)."""
    shutil.copytree(honest, out)
    record = json.loads((out / "update.json").read_text()) | {"facility": out.name}
    (out / "update.json").write_text(json.dumps(record))
    weights = out / "model.safetensors"
    if kind == "nan":
        with open(weights, "r+b") as fh:
            fh.seek(-4, 2)
            fh.write(struct.pack("<f", float("nan")))
    else:
        header = b'{"__metadata__": {"format": "pt"}' + b" " * (39 * 1024 * 1024) + b"}"
        weights.write_bytes(struct.pack("<Q", len(header)) + header)


def run(workdir: Path, counts: list[int], preset: str, hostile: int = 2) -> dict:
    global_dir = workdir / "global"
    if not global_dir.exists():
        save_model(global_dir, preset)
    model_bytes = read_checkpoint(global_dir).total_bytes
    base_fp = fingerprint(global_dir)
    for i in range(max(counts)):
        if not (workdir / f"facility{i}").exists():
            make_update(global_dir, workdir / f"facility{i}", f"facility{i}", i, base_fp)
    spoiled = [workdir / name for name in ("nan-at-the-end", "huge-header")[:hostile]]
    for path, kind in zip(spoiled, ("nan", "header"), strict=False):
        if not path.exists():
            make_hostile(workdir / "facility0", path, kind)
    baseline, _ = peak_rss([sys.executable, "-c", "import torch, transformers"])
    results = {"model_bytes": model_bytes, "baseline_rss": baseline, "runs": {}}
    print(f"model {model_bytes / 1e6:.0f} MB; bare 'import torch, transformers' peak RSS {baseline / 1e6:.0f} MB")
    for n in counts:
        out = workdir / f"out{n}"
        cmd = [
            sys.executable,
            "-m",
            "xffl_cwl.cli",
            "aggregate",
            "--global",
            str(global_dir),
            "--out",
            str(out),
            "--strategy",
            "fedadam",
        ]
        cmd += [a for i in range(n) for a in ("--update", str(workdir / f"facility{i}"))]
        cmd += [a for path in spoiled for a in ("--update", str(path))]
        rss, seconds = peak_rss(cmd)
        record = json.loads((out / "aggregate.json").read_text())
        moved = record["bytes_read"] + record["bytes_written"]
        assert len(record["rejected"]) == len(spoiled), record["rejected"]
        results["runs"][n] = {
            "peak_rss": rss,
            "seconds": seconds,
            "bytes_read": record["bytes_read"],
            "bytes_written": record["bytes_written"],
        }
        print(
            f"{n} updates + {len(spoiled)} hostile: peak RSS {rss / 1e6:.0f} MB ({(rss - baseline) / 1e6:+.0f} MB over baseline, "
            f"{(rss - baseline) / model_bytes:.2f} of the model), {seconds:.1f} s, {moved / seconds / 1e6:.0f} MB/s read+written"
        )
        shutil.rmtree(out)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--updates", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--hostile", type=int, default=2, choices=(0, 1, 2), help="hostile updates in the mix")
    parser.add_argument("--preset", default="bench-400mb")
    args = parser.parse_args()
    if args.workdir:
        run(args.workdir, args.updates, args.preset, args.hostile)
    else:
        with tempfile.TemporaryDirectory(prefix="xffl-bench-") as tmp:
            run(Path(tmp), args.updates, args.preset, args.hostile)


if __name__ == "__main__":
    main()
