"""The external runners, found next to this interpreter, and their validation modes."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from xffl_cwl.contract.layout import STREAMFLOW_YML, TMP_DIR
from xffl_cwl.errors import InputError


def executable(name: str) -> str:
    """A console script of this environment (preferred) or from PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise InputError(
            f"`{name}` is not installed in this environment; run `pip install -e .[test]` (cwltool) or reinstall xffl-cwl"
        )
    return found


def runner_env(run_dir: Path) -> dict[str, str]:
    """StreamFlow puts unbound steps and scratch under $TMPDIR/streamflow: keep that inside the run folder."""
    tmp = Path(run_dir).resolve() / TMP_DIR
    tmp.mkdir(exist_ok=True)
    return {**os.environ, "TMPDIR": str(tmp)}


def default_sigint() -> None:
    """In the child: take SIGINT by default, even if we were started with it ignored (background jobs)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _last_lines(text: str, n: int = 3) -> str:
    """The telling part of a runner's complaint: schema errors if any, else its last lines."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    schema_errors = list(dict.fromkeys(line[2:] for line in lines if line.startswith("- ")))
    return " | ".join(schema_errors[:n] if schema_errors else lines[-n:])


def cwltool_validate(main: Path) -> str | None:
    """None if cwltool accepts the workflow, else the end of its complaint."""
    proc = subprocess.run(
        [executable("cwltool"), "--validate", "--enable-ext", str(main)], capture_output=True, text=True
    )
    return None if proc.returncode == 0 else f"cwltool --validate: {_last_lines(proc.stderr + proc.stdout)}"


def streamflow_validate(run_dir: Path) -> str | None:
    proc = subprocess.run(
        [executable("streamflow"), "run", "--validate", STREAMFLOW_YML],
        cwd=run_dir,
        capture_output=True,
        text=True,
        env=runner_env(run_dir),
    )
    return None if proc.returncode == 0 else f"streamflow run --validate: {_last_lines(proc.stderr + proc.stdout)}"
