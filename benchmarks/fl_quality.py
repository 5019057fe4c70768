"""Is federating worth it? The same training compute spent federated, by each facility alone, and centralized.

    python benchmarks/fl_quality.py [--rounds 5] [--steps 20] [--facilities 3] [--lr 3e-3]
        [--strategies fedavg,fedavgm,fedadam] [--out DIR] [--workdir DIR]

On the demo's non-IID task (demo assets: every facility has a different kind of text; the held-out
test set mixes all of them), with T = rounds x steps x facilities optimizer steps of batch 8 each:

- federated: `rounds` rounds, every facility `steps` local steps per round, merged by each strategy
  (the aggregation the workflow runs, weights capped as the generator caps them: steps x batch);
- alone: each facility spends all T steps on its own data;
- centralized: T steps on the union of every facility's data.

Every model is scored on the all-facility test set (mean token loss). The real library functions run
in this one process (train, aggregate, evaluate: what the tools call), so the comparison is the
learning, not start-up. Prints a table, and writes fl_quality.json, fl_quality.md and fl_quality.png
to --out. Targets: the best federated model below every alone model, and within 10% of centralized.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

BATCH, SEQ_LEN, EVAL_BATCH = 8, 64, 16
TARGET_CENTRALIZED = 0.10
SERVER_KEYS = {"lr": "server_lr", "m": "momentum"}  # fedavgm/lr=1.5/m=0.5: server learning rate 1.5, momentum 0.5


def _train(model: Path, dataset: Path, out: Path, facility: str, round_number: int, steps: int, lr: float) -> Path:
    from xffl_cwl.contract.options import TrainOptions
    from xffl_cwl.learning.train import TrainConfig, train

    options = TrainOptions(local_steps=steps, batch_size=BATCH, lr=lr, seq_len=SEQ_LEN)
    train(TrainConfig(model, dataset, out, facility, round_number, options, device="cpu", progress=False))
    return out


def _loss(model: Path, test_set: Path) -> float:
    from xffl_cwl.contract.options import EvaluateOptions
    from xffl_cwl.learning.evaluation import evaluate_model_dir

    return float(
        evaluate_model_dir(model, test_set, EvaluateOptions(seq_len=SEQ_LEN, batch_size=EVAL_BATCH), "cpu")["loss"]
    )


def federated(
    assets, names: list[str], strategy: str, rounds: int, steps: int, lr: float, work: Path, **server
) -> list[float]:
    """Held-out loss after every round (index 0: the initial model)."""
    from xffl_cwl.contract.options import AggregateOptions
    from xffl_cwl.learning.aggregation import AggregateConfig, aggregate

    model, state = assets.model, None
    losses = [_loss(model, assets.test_set)]
    options = AggregateOptions(strategy=strategy, min_updates=len(names), **server)
    for r in range(1, rounds + 1):
        updates = [_train(model, assets.datasets[n], work / f"{strategy}-r{r}" / n, n, r, steps, lr) for n in names]
        out = work / f"{strategy}-global-{r}"
        state_out = work / f"{strategy}-state-{r}"
        aggregate(
            AggregateConfig(
                model,
                list(updates),
                out,
                options,
                state,
                state_out,
                r,
                max_weight={n: float(steps * BATCH) for n in names},
            )
        )
        model, state = out, (state_out if state_out.is_dir() else None)
        losses.append(_loss(model, assets.test_set))
    return losses


def union_dataset(assets, names: list[str], out: Path) -> Path:
    """Every facility's texts in one JSONL file: the centralized baseline's data."""
    from datasets import load_from_disk

    with open(out, "w", encoding="utf-8") as fh:
        for name in names:
            for text in load_from_disk(str(assets.datasets[name]))["text"]:
                fh.write(json.dumps({"text": text}) + "\n")
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.2, 4.0))
    steps_per_round = result["steps"] * len(result["facilities"])
    for name, losses in result["federated"].items():
        ax.plot([i * steps_per_round for i in range(len(losses))], losses, "o-", label=f"federated, {name}")
    total = result["total_steps"]
    ax.axhline(result["centralized"], color="black", ls="--", label="centralized (all data in one place)")
    if "centralized_serial" in result:
        ax.axhline(
            result["centralized_serial"],
            color="black",
            ls="-.",
            lw=0.8,
            label=f"centralized, {result['rounds'] * result['steps']} steps (one facility's time)",
        )
    for name, loss in result["alone"].items():
        ax.axhline(loss, ls=":", color="#999", lw=1)
        ax.annotate(f"{name} alone", (total, loss), textcoords="offset points", xytext=(4, 0), va="center", fontsize=7)
    ax.set_xlabel("optimizer steps spent (all facilities)")
    ax.set_ylabel("held-out loss, all facilities' tasks")
    ax.set_title("Same compute: federated vs alone vs centralized")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=110, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)


def table(result: dict) -> str:
    central = result["centralized"]
    rows = [("initial model", result["initial"])]
    rows += [(f"federated, {name}", losses[-1]) for name, losses in result["federated"].items()]
    rows += [(f"{name} alone", loss) for name, loss in result["alone"].items()]
    rows.append(("centralized", central))
    if "centralized_serial" in result:
        rows.append(
            (
                f"centralized, {result['rounds'] * result['steps']} steps (one facility's time)",
                result["centralized_serial"],
            )
        )
    lines = ["| training | held-out loss | vs centralized |", "|---|---:|---:|"]
    lines += [f"| {name} | {loss:.4f} | {loss / central - 1:+.1%} |" for name, loss in rows]
    return "\n".join(lines)


def verdict(result: dict) -> list[tuple[str, bool, str]]:
    best_name, best = min(((n, curve[-1]) for n, curve in result["federated"].items()), key=lambda x: x[1])
    worst_alone = min(result["alone"].values())
    gap = best / result["centralized"] - 1
    return [
        (f"federated ({best_name}) below every facility alone", best < worst_alone, f"{best:.4f} < {worst_alone:.4f}"),
        (
            f"federated ({best_name}) within {TARGET_CENTRALIZED:.0%} of centralized",
            gap <= TARGET_CENTRALIZED,
            f"{gap:+.1%}",
        ),
    ]


def run(
    rounds: int, steps: int, facilities: int, lr: float, strategies: list[str], work: Path, baselines: bool = True
) -> dict:
    from xffl_cwl.learning.demo_assets import facility_names, make_demo_assets

    names = facility_names(facilities)
    started = time.monotonic()
    assets = make_demo_assets(work / "assets", names)
    total = rounds * steps * len(names)
    result: dict = {"rounds": rounds, "steps": steps, "lr": lr, "facilities": names, "total_steps": total}
    result["federated"] = {}
    for spec in strategies:
        name, *settings = spec.split("/")
        server = {SERVER_KEYS[k]: float(v) for k, _, v in (s.partition("=") for s in settings)}
        result["federated"][spec] = federated(assets, names, name, rounds, steps, lr, work / "fed" / spec, **server)
        print(f"  federated {spec}: {' -> '.join(f'{x:.3f}' for x in result['federated'][spec])}", flush=True)
    result["initial"] = (
        next(iter(result["federated"].values()))[0] if strategies else _loss(assets.model, assets.test_set)
    )
    result["alone"] = {}
    if not baselines:
        return result
    for n in names:
        model = _train(assets.model, assets.datasets[n], work / f"alone-{n}", n, 1, total, lr)
        result["alone"][n] = _loss(model, assets.test_set)
        print(f"  {n} alone: {result['alone'][n]:.3f}", flush=True)
    union = union_dataset(assets, names, work / "union.jsonl")
    central = _train(assets.model, union, work / "centralized", "centralized", 1, total, lr)
    result["centralized"] = _loss(central, assets.test_set)
    print(f"  centralized: {result['centralized']:.3f}", flush=True)
    # One machine for as long as one facility trained (rounds x steps): the same wall-clock, a third of the compute
    serial = _train(assets.model, union, work / "centralized-serial", "centralized", 1, rounds * steps, lr)
    result["centralized_serial"] = _loss(serial, assets.test_set)
    print(f"  centralized, {rounds * steps} steps: {result['centralized_serial']:.3f}", flush=True)
    result["seconds"] = time.monotonic() - started
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20, help="local steps per round")
    parser.add_argument("--facilities", type=int, default=3)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument(
        "--strategies",
        default="fedavg,fedavgm/lr=1.5/m=0.3,fedadam/lr=0.03",
        help="comma-separated; NAME/lr=X/m=Y sets the server learning rate X and momentum Y",
    )
    parser.add_argument("--out", type=Path, default=Path("."), help="where fl_quality.{json,md,png} go")
    parser.add_argument("--workdir", type=Path, help="keep models and assets here (default: a temporary folder)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")  # the libraries' progress bars
    strategies = [s for s in args.strategies.split(",") if s]
    with tempfile.TemporaryDirectory(prefix="fl-quality-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        print(
            f"fl_quality: {args.facilities} facilities, {args.rounds} rounds x {args.steps} local steps "
            f"= {args.rounds * args.steps * args.facilities} steps for every kind of training",
            flush=True,
        )
        result = run(args.rounds, args.steps, args.facilities, args.lr, strategies, work)
    args.out.mkdir(parents=True, exist_ok=True)
    result["verdict"] = [{"target": t, "pass": ok, "value": v} for t, ok, v in verdict(result)]
    (args.out / "fl_quality.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "fl_quality.md").write_text(table(result) + "\n")
    plot(result, args.out / "fl_quality.png")
    print(table(result))
    for target, ok, value in verdict(result):
        print(f"{'PASS' if ok else 'MISS'}: {target} ({value})")
    print(f"{result['seconds']:.0f} s; wrote {args.out / 'fl_quality.json'}, .md, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
