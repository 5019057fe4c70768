"""scripts/facilities.sh: idempotent, isolated clusters, and `down` stops exactly what `up` started."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from conftest import FACILITIES_DIR, REPO

SCRIPT = REPO / "scripts" / "facilities.sh"
DAEMONS = ("munge/munged.pid", "run/slurmctld.pid", "run/slurmd.pid", "run/sshd.pid")


def _pids() -> dict[str, str]:
    return {
        f"{name}/{d}": (FACILITIES_DIR / "fac" / name / d).read_text().strip()
        for name in ("leonardo", "lumi")
        for d in DAEMONS
    }


def _script(action: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), action], capture_output=True, text=True, timeout=900)


def test_up_is_idempotent_and_clusters_are_isolated(facilities):
    before = _pids()
    assert _script("up").returncode == 0
    assert _pids() == before, "a second `up` must not restart running daemons"
    leonardo, lumi = facilities["by_name"]["leonardo"], facilities["by_name"]["lumi"]
    assert (FACILITIES_DIR / "fac/leonardo/munge/munge.key").read_bytes() != (
        FACILITIES_DIR / "fac/lumi/munge/munge.key"
    ).read_bytes()
    # lumi's controller refuses a client that authenticates with leonardo's munge
    conf = (
        Path(lumi["slurm_conf"]).read_text().replace("fac/lumi/munge/munge.socket", "fac/leonardo/munge/munge.socket")
    )
    foreign = FACILITIES_DIR / "foreign-slurm.conf"
    foreign.write_text(conf)
    try:
        proc = subprocess.run(
            ["sinfo", "-h"], capture_output=True, text=True, env={**os.environ, "SLURM_CONF": str(foreign)}, timeout=60
        )
        assert proc.returncode != 0
    finally:
        foreign.unlink()
    ok = subprocess.run(
        ["sinfo", "-h", "-o", "%N"],
        capture_output=True,
        text=True,
        env={**os.environ, "SLURM_CONF": leonardo["slurm_conf"]},
    )
    assert ok.stdout.strip() == leonardo["node"]
    known = Path(facilities["known_hosts"]).read_text()
    assert "[127.0.0.1]:2222 ssh-ed25519 " in known and "[127.0.0.1]:2223 ssh-ed25519 " in known


def test_down_stops_exactly_its_daemons_and_up_restores_them(facilities):
    bystander = subprocess.Popen(["sleep", "300"])  # not ours: must survive
    try:
        before = _pids()
        assert _script("down").returncode == 0
        status = _script("status").stdout
        assert status.count(":down") == 8 and ":up" not in status
        for pid in before.values():
            assert not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
        assert bystander.poll() is None
    finally:
        up = _script("up")
        bystander.kill()
    assert up.returncode == 0, up.stderr[-2000:]
    assert _script("status").stdout.count(":up") == 8
    assert set(_pids().values()).isdisjoint(before.values())
