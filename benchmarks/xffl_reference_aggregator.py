"""The xFFL example's aggregation round, rebuilt from its published algorithm: the yardstick `xffl-cwl aggregate` must beat.

    python benchmarks/xffl_reference_aggregator.py GLOBAL_DIR UPDATE_DIR... --out OUT_DIR [--state F] [--state-out F]

Written from the description, not from xFFL's code, and kept as plain as the original: the previous
global model loaded whole in fp32, every client model loaded whole (all held at once), client deltas
averaged unweighted, their negation used as the gradient, the global gradient norm clipped to 1.0,
one AdamW step (lr 0.1, betas (0.9, 0.99), weight decay 0.01) whose state optionally comes from and
goes to a file, and the new model saved in bf16. Plain torch with its default threads: the point is
what a straightforward server costs, not how fast it could be made.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

LR, BETAS, WEIGHT_DECAY, MAX_GRAD_NORM = 0.1, (0.9, 0.99), 0.01, 1.0


def load_whole(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model directory, all in memory (a sharded checkpoint's files merged)."""
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    if not tensors:
        raise SystemExit(f"{directory}: no *.safetensors weights")
    return tensors


def copy_side_files(src: Path, out: Path) -> None:
    """Config and tokenizer files, so that the output is a loadable model directory."""
    for path in src.iterdir():
        if path.is_file() and not path.name.endswith((".safetensors", ".safetensors.index.json")):
            shutil.copy2(path, out / path.name)


def aggregate(global_dir: Path, update_dirs: list[Path], out: Path, state: Path | None, state_out: Path | None) -> None:
    names = list(load_whole(global_dir))  # the order the optimizer state is keyed by
    start = load_whole(global_dir)
    params = [torch.nn.Parameter(start[name].to(torch.float32)) for name in names]
    del start
    clients = [load_whole(d) for d in update_dirs]
    with torch.no_grad():
        for name, param in zip(names, params, strict=True):
            mean_delta = torch.stack([c[name].to(torch.float32) - param for c in clients]).mean(dim=0)
            param.grad = -mean_delta
    del clients
    torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
    optimizer = torch.optim.AdamW(params, lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY)
    if state is not None:
        optimizer.load_state_dict(torch.load(state, weights_only=True))
    optimizer.step()
    if state_out is not None:
        torch.save(optimizer.state_dict(), state_out)
    out.mkdir(parents=True)
    new = {name: p.detach().to(torch.bfloat16).contiguous() for name, p in zip(names, params, strict=True)}
    save_file(new, str(out / "model.safetensors"), metadata={"format": "pt"})
    copy_side_files(global_dir, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("global_dir", type=Path)
    parser.add_argument("updates", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--state", type=Path, help="AdamW state of the previous round (torch.save file)")
    parser.add_argument("--state-out", type=Path, help="where to save this round's AdamW state")
    args = parser.parse_args()
    aggregate(args.global_dir, args.updates, args.out, args.state, args.state_out)


if __name__ == "__main__":
    main()
