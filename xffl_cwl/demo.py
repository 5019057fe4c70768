"""`xffl-cwl demo`: the whole federation on this machine, from nothing, in a few minutes.

Builds the demo assets, writes a federation.yml a user can read and edit, generates the run
folder and runs it with StreamFlow: every "facility" is a local deployment with its own working
directory, so the model really moves between them.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from xffl_cwl.contract.strategies import STRATEGIES
from xffl_cwl.errors import InputError
from xffl_cwl.execution.supervisor import RunResult, run
from xffl_cwl.federation import load_federation
from xffl_cwl.generator import generate
from xffl_cwl.learning.demo_assets import facility_names, make_demo_assets

MARKER = ".xffl-demo"

FEDERATION_TEMPLATE = """\
# A demo federation: {count} facilities on this machine, each with a different kind of text.
# Change anything, then: xffl-cwl generate federation.yml -o run --force && xffl-cwl run run
name: demo
rounds: {rounds}
model: assets/model                 # tiny LLaMA-architecture model, random weights
test_set: assets/data/test.jsonl    # held out, mixes every facility's kind of text
training:
  mode: full                        # or lora (then see training.lora and aggregation.lora_merge)
  local_steps: {steps}
  batch_size: 8
  lr: 0.003
  seq_len: 64
aggregation:
  strategy: fedavg                  # {stateful} carry a server state
  min_updates: {count}
facilities:
{facilities}"""


def _prepare(workdir: Path) -> None:
    """A previous demo folder (it has our marker) is replaced; anything else is left alone."""
    if workdir.exists() and any(workdir.iterdir()):
        if not (workdir / MARKER).exists():
            raise InputError(f"--workdir {workdir} exists and is not a previous demo; choose another folder")
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / MARKER).write_text("made by xffl-cwl demo; `xffl-cwl demo` replaces this folder\n")


def run_demo(
    workdir: Path,
    facilities: int = 3,
    rounds: int = 3,
    steps: int = 20,
    say: Callable[[str], None] = print,
    timeout: float | None = None,
) -> RunResult:
    if rounds < 1 or steps < 1:
        raise InputError("--rounds and --steps must be at least 1")
    names = facility_names(facilities)
    workdir = Path(workdir).resolve()
    _prepare(workdir)
    say(f"building demo assets in {workdir / 'assets'}")
    assets = make_demo_assets(workdir / "assets", names)
    entries = "".join(f"  - name: {n}\n    dataset: assets/data/{n}    # {assets.tasks[n]}\n" for n in names)
    federation = workdir / "federation.yml"
    stateful = ", ".join(s.name for s in STRATEGIES.values() if s.slots)
    text = FEDERATION_TEMPLATE.format(
        count=len(names), rounds=rounds, steps=steps, facilities=entries, stateful=stateful
    )
    federation.write_text(text)
    spec = load_federation(federation)
    generate(spec, workdir / "run")
    say(
        f"generated {workdir / 'run'}: {', '.join(names)} train, the aggregator merges; running {rounds} rounds with StreamFlow"
    )
    return run(workdir / "run", say=say, timeout=timeout)
