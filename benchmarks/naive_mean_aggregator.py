"""A naive load-everything weighted mean of full updates: the speed yardstick for `xffl-cwl aggregate`.

    python benchmarks/naive_mean_aggregator.py GLOBAL_DIR UPDATE_DIR... --out OUT_DIR

Loads the global model and every update whole (safetensors.torch.load_file), takes the mean of the
updates weighted by their update.json `samples`, and writes it in the global model's dtypes. No
validation, no bounded memory: the least work a correct FedAvg can do, so the streaming aggregator is
judged by how close it comes to this (the issue's target: within 1.3x).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from xffl_reference_aggregator import copy_side_files, load_whole


def aggregate(global_dir: Path, update_dirs: list[Path], out: Path) -> None:
    base = load_whole(global_dir)
    samples = [float(json.loads((d / "update.json").read_text())["samples"]) for d in update_dirs]
    updates = [load_whole(d) for d in update_dirs]
    total = sum(samples)
    merged: dict[str, torch.Tensor] = {}
    for name, tensor in base.items():
        acc = torch.zeros(tensor.shape, dtype=torch.float32)
        for weight, update in zip(samples, updates, strict=True):
            acc.add_(update[name].to(torch.float32), alpha=weight / total)
        merged[name] = acc.to(tensor.dtype)
    out.mkdir(parents=True)
    save_file(merged, str(out / "model.safetensors"), metadata={"format": "pt"})
    copy_side_files(global_dir, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("global_dir", type=Path)
    parser.add_argument("updates", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    aggregate(args.global_dir, args.updates, args.out)


if __name__ == "__main__":
    main()
