"""How long `xffl-cwl --help` takes (median of 5 runs); the CLI must not import torch to answer it."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time


def main() -> None:
    times = []
    for _ in range(5):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "xffl_cwl.cli", "--help"], check=True, capture_output=True)
        times.append(time.perf_counter() - started)
    print(
        f"xffl-cwl --help: median {statistics.median(times) * 1000:.0f} ms, max {max(times) * 1000:.0f} ms over {len(times)} runs"
    )


if __name__ == "__main__":
    main()
