"""How many CPUs a process may use right now: the shared login node or aggregator host case.

A second thread only helps when a CPU is idle to run it; on a machine whose other work already
keeps every CPU busy it competes with that work and with our own main thread, and a task that
took 1.4 s quiet took 2.3 s beside one busy process with its helper threads, against 1.9 s without.
"""

from __future__ import annotations

import os
import time


def _runnable() -> int | None:
    """Tasks (threads) runnable at this instant on the whole machine, this one included (Linux)."""
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("procs_running "):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def spare_cpus(samples: int = 3, interval: float = 0.005) -> int:
    """CPUs of this process's affinity that no other runnable task is using (median of a few samples), at least 1."""
    cpus = len(os.sched_getaffinity(0))
    seen = []
    for i in range(samples):
        value = _runnable()
        if value is None:
            return cpus
        seen.append(value)
        if i + 1 < samples:
            time.sleep(interval)
    others = sorted(seen)[len(seen) // 2] - 1
    return max(1, cpus - max(0, others))
