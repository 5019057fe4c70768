"""Stopped half-way, nothing is left behind: no temporary output after SIGTERM, no StreamFlow after a crash."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import REPO, write_federation
from xffl_cwl.federation import load_federation
from xffl_cwl.generator import generate
from xffl_cwl.learning.model_dir import fingerprint


@pytest.fixture(scope="module")
def slow_round(tmp_path_factory):
    """A 48 MB global model and two updates: with tiny chunks, an aggregation that takes seconds."""
    root = tmp_path_factory.mktemp("slow")
    g = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.randn(1024, 4096, generator=g) for i in range(3)}
    (root / "global").mkdir()
    save_file(tensors, str(root / "global" / "model.safetensors"))
    fp = fingerprint(root / "global")
    from conftest import write_update

    updates = [
        write_update(root / name, name, {k: v + 0.01 for k, v in tensors.items()}, fp) for name in ("leonardo", "lumi")
    ]
    return root, updates


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_aggregation_leaves_no_temporary_output(slow_round, tmp_path, sig):
    root, updates = slow_round
    out = tmp_path / "next"
    args = ["aggregate", "--global", str(root / "global"), "--out", str(out), "--chunk-mb", "0.01"]
    args += [a for u in updates for a in ("--update", str(u))]
    proc = subprocess.Popen(
        [sys.executable, "-m", "xffl_cwl.cli", *args],
        cwd=REPO,
        stderr=subprocess.PIPE,
        text=True,
        # as from a terminal: a shell's background job (a CI script's `cmd &`) starts with SIGINT ignored,
        # and Python keeps an ignored SIGINT ignored
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".next.*")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, "the aggregation ended before it could be interrupted; make the model larger"
    time.sleep(0.2)  # mid-write
    proc.send_signal(sig)
    proc.wait(timeout=30)
    assert proc.returncode in (1, 130, 143), proc.stderr.read()
    assert not out.exists()
    assert not list(tmp_path.glob(".next.*")), "the temporary output must be removed"


def test_a_crash_of_the_supervisor_stops_streamflow(tmp_path, demo_assets):
    """Any exception in `xffl-cwl run` (here: its progress printer) stops StreamFlow and its tools."""
    from xffl_cwl.execution.supervisor import run

    path = write_federation(tmp_path / "federation.yml", demo_assets, ["leonardo"], rounds=2, steps=200)
    run_dir = tmp_path / "run"
    generate(load_federation(path), run_dir)

    def say(text: str) -> None:
        if "training started" in text:
            raise RuntimeError("a bug in the progress printer")

    with pytest.raises(RuntimeError, match="a bug in the progress printer"):
        run(run_dir, say=say, check=False)
    deadline = time.monotonic() + 30
    while _processes_of(run_dir) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _processes_of(run_dir), "StreamFlow or a tool of the run is still running"
    assert not (run_dir / "out" / "model").exists()


def _processes_of(run_dir: Path) -> list[str]:
    """Processes whose command line or working directory is inside the run folder."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue
        if str(run_dir) in cmd or cwd.startswith(str(run_dir)):
            found.append(f"{pid}: {cmd[:120]}")
    return found
