"""Start the workers of one training and see them through: local processes (torchrun-style) on
one machine, or `srun` inside a SLURM allocation; every line they print reaches our stderr with
its rank, and the first worker that dies takes the others down at once and names itself.

The process CWL runs stays one command with one set of outputs: the workers are its children,
the main one (rank 0) writes the update, and this process's exit code is the training's.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque

from xffl_cwl.contract.layout import NNODES_ENV, WORKER_ENV, WORKER_EXEC_ENV

STOP_GRACE = 10.0  # seconds the other workers get between SIGTERM and SIGKILL once one has died
SRUN_TASK = re.compile(r"srun: error: \S+: tasks? (\d+)(?:-\d+)?: (.*)")
LABEL = re.compile(r"^\s*(\d+): ?(.*)$")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def use_srun(nnodes: int) -> bool:
    """Inside a SLURM allocation with srun at hand, srun starts the workers; on several nodes it must."""
    return nnodes > 1 or (bool(os.environ.get("SLURM_JOB_ID")) and shutil.which("srun") is not None)


class Workers:
    """The running workers: their output, their last lines, and who failed first."""

    def __init__(self) -> None:
        self.last: dict[int, deque] = {}
        self.failed: tuple[int, str] | None = None
        self.lock = threading.Lock()

    def line(self, rank: int, text: str) -> None:
        text = text.rstrip("\n")
        if text.strip():
            self.last.setdefault(rank, deque(maxlen=2)).append(text.strip())
        sys.stderr.write(f"[rank {rank}] {text}\n")
        sys.stderr.flush()

    def fail(self, rank: int, how: str) -> None:
        with self.lock:
            if self.failed is None:
                self.failed = (rank, how)

    def reason(self) -> str:
        rank, how = self.failed or (0, "failed")
        last = (self.last.get(rank) or [""])[-1].removeprefix("xffl-cwl train: error: ")
        return f"worker rank {rank} {how}" + (f"; its last line: {last[:300]}" if last else "")


def _describe(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def _stop_all(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + STOP_GRACE
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _pump_local(stream, rank: int, workers: Workers, to_stdout: bool) -> None:
    for line in iter(stream.readline, ""):
        if to_stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
        else:
            workers.line(rank, line)
    stream.close()


def _pump_srun(stream, workers: Workers, is_stdout: bool) -> None:
    for line in iter(stream.readline, ""):
        match = LABEL.match(line)
        if match is None:
            failure = SRUN_TASK.search(line)
            if failure:
                workers.fail(int(failure[1]), f"ended ({failure[2].strip()}, says srun)")
            sys.stderr.write(line)
            sys.stderr.flush()
            continue
        rank, text = int(match[1]), match[2]
        if is_stdout and rank == 0:
            sys.stdout.write(text + "\n")
            sys.stdout.flush()
        else:
            workers.line(rank, text)
    stream.close()


def _environment(nnodes: int, master: str, port: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            WORKER_ENV: "1",
            NNODES_ENV: str(nnodes),
            "MASTER_ADDR": master,
            "MASTER_PORT": str(port),
            "PYTHONUNBUFFERED": "1",
        }
    )
    # glibc keeps freed blocks of a few MB in its heap once it has raised its mmap threshold; a
    # worker gathers and frees a whole layer at a time, so a fixed threshold hands them back.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    return env


def launch(train_args: list[str], nnodes: int, nproc: int) -> int:
    """Run `xffl-cwl train TRAIN_ARGS` on nnodes x nproc workers; 0 when every one succeeded."""
    size = nnodes * nproc
    workers = Workers()
    command = [sys.executable, "-m", "xffl_cwl.cli", "train", *train_args]
    if use_srun(nnodes):
        if shutil.which("srun") is None:
            print(
                f"xffl-cwl train: error: {nnodes} nodes need srun, which is not found here (inside a container, "
                "bind the site's SLURM into it, or run the job with container runtime none)",
                file=sys.stderr,
            )
            return 2
        prefix = shlex.split(os.environ.get(WORKER_EXEC_ENV, ""))
        if prefix:
            command = ["xffl-cwl", "train", *train_args]
        srun = [
            "srun", "--overlap", f"--nodes={nnodes}", f"--ntasks={size}", f"--ntasks-per-node={nproc}",
            "--kill-on-bad-exit=1", "--label", "--unbuffered", *prefix, *command,
        ]  # fmt: skip
        env = _environment(nnodes, socket.gethostname(), free_port())
        print(f"xffl-cwl train: {size} workers ({nnodes} node(s) x {nproc}) started with srun", file=sys.stderr)
        procs = [
            subprocess.Popen(
                srun, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        ]
        pumps = [
            threading.Thread(target=_pump_srun, args=(procs[0].stdout, workers, True), daemon=True),
            threading.Thread(target=_pump_srun, args=(procs[0].stderr, workers, False), daemon=True),
        ]
    else:
        env = _environment(1, "127.0.0.1", free_port())
        # the workers share this machine's cores (as torchrun does; a SLURM template sets its own)
        env.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // nproc)))
        print(f"xffl-cwl train: {size} workers started as local processes", file=sys.stderr)
        procs, pumps = [], []
        for rank in range(size):
            env_rank = env | {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(size)}
            p = subprocess.Popen(
                command,
                env=env_rank,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            procs.append(p)
            pumps.append(threading.Thread(target=_pump_local, args=(p.stdout, rank, workers, rank == 0), daemon=True))
            pumps.append(threading.Thread(target=_pump_local, args=(p.stderr, rank, workers, False), daemon=True))
    for pump in pumps:
        pump.start()
    stopped: list[int] = []
    ended: list[tuple[int, int]] = []  # (rank, exit code) in the order the workers ended
    changed = threading.Event()

    def watch(rank: int, proc: subprocess.Popen) -> None:
        code = proc.wait()
        ended.append((rank, code))
        changed.set()

    watchers = [threading.Thread(target=watch, args=(r, p), daemon=True) for r, p in enumerate(procs)]
    for watcher in watchers:
        watcher.start()

    def forward(signum: int, _frame) -> None:
        stopped.append(signum)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while len(ended) < len(procs):
            changed.wait(1.0)
            changed.clear()
            first_bad = next(((r, c) for r, c in list(ended) if c != 0), None)
            if first_bad is not None and not stopped:
                if len(procs) > 1:  # the first to die is the culprit; the others then only lose their peers
                    workers.fail(first_bad[0], _describe(first_bad[1]))
                break
        _stop_all(procs)
        for thread in pumps + watchers:
            thread.join(timeout=5)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if stopped:
        return 128 + stopped[0]
    codes = [p.returncode for p in procs]
    if all(c == 0 for c in codes):
        return 0
    if workers.failed is None:
        rank = next(r for r, c in enumerate(codes) if c != 0) if len(procs) > 1 else 0
        workers.fail(rank, _describe(codes[rank]))
    print(f"xffl-cwl train: error: {workers.reason()}", file=sys.stderr)
    return 1
