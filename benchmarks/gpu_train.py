"""The GPU check of sharded training, prepared for a machine with GPUs (none is needed to read it).

1. Speed and memory: a ~1B-parameter LLaMA-architecture model built from a config (preset
   `bench-1b`), trained with `xffl-cwl train` on every local GPU (FSDP2, NCCL/RCCL, bf16 compute
   with fp32 master weights), full fine-tuning; prints tokens/s and each worker's peak GPU memory.
2. Equivalence: a small model in fp32 on 1 GPU with micro-batch 8 and on N GPUs with micro-batch
   8/N (the same global batch and seed): the loss trajectories and the updates must agree within
   fp32 tolerance (exit 1 otherwise).

    python benchmarks/gpu_train.py [--workdir DIR] [--steps 10] [--seq-len 1024] [--batch 4]
    python benchmarks/gpu_train.py --device cpu --workers 2 --preset small   # the same script on CPU
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

PEAK = re.compile(r"worker (\d+) of (\d+): peak RSS (\d+) MiB(?:, GPU (\d+) MiB)?")
LOSS_TOLERANCE = 1e-4  # fp32 on GPUs: reduction order and TF32-free matmuls differ between 1 and N
WEIGHT_TOLERANCE = 1e-4


def assets(root: Path, preset: str, samples: int):
    from xffl_cwl.learning.demo_assets import facility_names, make_demo_assets

    if not (root / "assets.json").exists():
        make_demo_assets(root, facility_names(1), samples_per_facility=samples, test_samples_per_task=10, preset=preset)
    return root / "model", next((root / "data").iterdir())


def train(model: Path, data: Path, out: Path, workers: int, *options: str) -> tuple[dict, str]:
    shutil.rmtree(out, ignore_errors=True)
    command = [
        sys.executable, "-m", "xffl_cwl.cli", "train", "--model", str(model), "--dataset", str(data), "--out", str(out),
        "--facility", "gpu", "--no-progress", "--nproc-per-node", str(workers), *options,
    ]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"training on {workers} worker(s) failed:\n{proc.stderr[-4000:]}")
    return json.loads((out / "update.json").read_text()), proc.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--workers", type=int, help="default: every local GPU")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--preset", default="bench-1b", help="the model of the speed run")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4, help="micro-batch per worker in the speed run")
    parser.add_argument("--skip-speed", action="store_true")
    args = parser.parse_args()
    workers = args.workers or max(1, torch.cuda.device_count())
    work = Path(args.workdir or tempfile.mkdtemp(prefix="xffl-gpu-"))
    device = ["--device", args.device]
    gpus = torch.cuda.device_count()
    print(
        f"{gpus} GPU(s): {torch.cuda.get_device_name(0) if gpus else 'none'}; torch {torch.__version__}; {workers} workers"
    )

    if not args.skip_speed:
        model, data = assets(work / args.preset, args.preset, samples=max(2000, workers * args.batch * args.steps * 4))
        params = sum(f.stat().st_size for f in model.glob("*.safetensors")) / 4
        record, log = train(
            model, data, work / "speed", workers, *device, "--precision", "bf16", "--local-steps", str(args.steps),
            "--batch-size", str(args.batch), "--seq-len", str(args.seq_len), "--eval-fraction", "0.01",
        )  # fmt: skip
        peaks = sorted((int(m[1]), int(m[3]), int(m[4] or 0)) for m in PEAK.finditer(log))
        print(
            f"speed: {params / 1e6:.0f}M parameters, full fine-tuning, bf16, {workers} workers, global batch "
            f"{record['hyperparameters']['global_batch']} x {args.seq_len} tokens: {record['tokens_per_second']:.0f} tokens/s"
        )
        for rank, rss, gpu in peaks:
            print(f"  worker {rank}: peak GPU memory {gpu} MiB, peak host RSS {rss} MiB")

    n = min(workers, 8)
    if n < 2:
        print("equivalence: needs 2 or more workers; skipped")
        return
    model, data = assets(work / "small", "small", samples=2000)
    common = [*device, "--local-steps", "5", "--seq-len", "128", "--lr", "1e-3"]
    one, _ = train(model, data, work / "one", 1, *common, "--batch-size", "8")
    many, _ = train(model, data, work / "many", n, *common, "--batch-size", str(max(1, 8 // n)))
    if 8 % n:
        print(f"equivalence: 8 is not divisible by {n} workers; the global batches differ, comparison skipped")
        return
    loss_gap = max(abs(one["train_loss"][k] - many["train_loss"][k]) for k in ("first", "last", "mean"))
    a, b = load_file(str(work / "one" / "model.safetensors")), load_file(str(work / "many" / "model.safetensors"))
    weight_gap = max((a[k] - b[k]).abs().max().item() for k in a)
    ok = loss_gap < LOSS_TOLERANCE and weight_gap < WEIGHT_TOLERANCE
    print(
        f"equivalence (1 vs {n} workers, fp32, same global batch): loss gap {loss_gap:.2e}, "
        f"largest weight gap {weight_gap:.2e} (tolerance {WEIGHT_TOLERANCE:g}): {'ok' if ok else 'FAILED'}"
    )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
