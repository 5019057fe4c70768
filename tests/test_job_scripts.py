"""Rendered job scripts of every preset, with hostile values, run under bash: nothing injected runs.

`srun`, `apptainer`, `singularity`, `podman` and `module` are stubs on PATH that do what the real ones do
with their arguments (run the command; the container stubs also record the image they were given), so
the script's shell really parses every value. The login-node command that writes the command file
and submits the script is run the same way, with a stub `sbatch`.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

from streamflow_plugins.xffl_facility.connector import XfflFacilityConnector
from xffl_cwl.facility.templates import presets

STUBS = {
    "srun": '#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n',
    "module": "#!/bin/bash\nexit 0\n",
    "container": (
        "#!/bin/bash\n"
        'shift  # exec\nwhile [[ $# -gt 0 ]]; do\n  case "$1" in\n'
        "    --bind|-B) shift 2 ;;\n    -*) shift ;;\n    *) break ;;\n  esac\ndone\n"
        'printf %s "$1" > "$XFFL_TEST_DIR/image"; shift\nexec "$@"\n'
    ),
    "podman": (
        "#!/bin/bash\n"
        'if [ "$1" = image ]; then echo 0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef; exit 0; fi\n'
        'shift  # run\nwhile [[ $# -gt 0 ]]; do\n  case "$1" in\n    -*) shift ;;\n    *) break ;;\n  esac\ndone\n'
        'printf %s "$1" > "$XFFL_TEST_DIR/image"; shift\nexec "$@"\n'
    ),
    "sbatch": '#!/bin/bash\ncat > "$XFFL_TEST_DIR/submitted.sh"\nprintf "%s\\0" "$@" > "$XFFL_TEST_DIR/sbatch-args"\necho 4242\n',
}
HOSTILE_IMAGES = [
    "/images/client.sif",
    '/images/a b".sif$(touch PWNED)',
    "/images/'; touch PWNED; echo '.sif",
    "/images/`touch PWNED`.sif",
    '/images/x"; touch PWNED; ".sif',
    "XFFL_EOF",
]
HOSTILE_BINDS = ("/scratch/x y", "/data/$(touch PWNED)", "/d/`touch PWNED`")
HOSTILE_OPTIONS = ("--nv; touch PWNED", "--cleanenv", "--env=$(touch PWNED)")
COMMAND = 'echo ran > "$XFFL_TEST_DIR/ran"\necho \'XFFL_EOF\'\necho "it\'s $(echo fine)" >> "$XFFL_TEST_DIR/ran"\n'


@pytest.fixture
def shell(tmp_path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("srun", "module", "sbatch", "podman"):
        (bin_dir / name).write_text(STUBS[name])
    for name in ("apptainer", "singularity"):
        (bin_dir / name).write_text(STUBS["container"])
    for path in bin_dir.iterdir():
        path.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "XFFL_TEST_DIR": str(tmp_path)}


def _connector(tmp_path: Path, preset: str, **container) -> XfflFacilityConnector:
    return XfflFacilityConnector(
        "site",
        str(tmp_path),
        host="127.0.0.1",
        username="someone",
        template=preset,
        container=container,
        sbatch={"account": "proj_x"},
        setup=["module load cuda", "export FROM_SETUP=1"],
    )


def _run(script: str, tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    path = tmp_path / "job.sh"
    path.write_text(script)
    return subprocess.run(["bash", str(path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("preset", presets())
@pytest.mark.parametrize("image", HOSTILE_IMAGES)
@pytest.mark.parametrize("runtime", ["apptainer", "podman"])
def test_hostile_container_values_never_run(tmp_path, shell, preset, image, runtime):
    job_dir = tmp_path / "job dir $(touch PWNED)"
    job_dir.mkdir()
    command_file = str(job_dir / ".xffl-job-x.sh")
    Path(command_file).write_text(COMMAND)
    if runtime == "apptainer":
        # the job hashes the .sif for the records: the image is a real file, at the hostile path
        image = str(tmp_path) + image if image.startswith("/") else image
        Path(tmp_path / image).parent.mkdir(parents=True, exist_ok=True)
        Path(tmp_path / image).write_bytes(b"SIF")
        runtime = "singularity" if preset != "karolina" else "apptainer"
    connector = _connector(
        tmp_path, preset, runtime=runtime, image=image, bind=list(HOSTILE_BINDS), options=list(HOSTILE_OPTIONS)
    )
    proc = _run(connector.job_script(command_file), tmp_path, shell)
    assert proc.returncode == 0, proc.stderr
    assert not list(tmp_path.rglob("PWNED")), "an injected command ran"
    assert (tmp_path / "ran").read_text() == "ran\nit's fine\n", "the job's own command ran, with its quoting intact"
    assert (tmp_path / "image").read_text() == image, "the runtime got the image as one word, exactly"


@pytest.mark.parametrize("preset", presets())
def test_without_a_container_the_command_file_runs_as_is(tmp_path, shell, preset):
    command_file = str(tmp_path / "a dir" / ".xffl-job-x.sh")
    Path(command_file).parent.mkdir()
    Path(command_file).write_text(COMMAND)
    proc = _run(_connector(tmp_path, preset, runtime="none").job_script(command_file), tmp_path, shell)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "ran").read_text() == "ran\nit's fine\n"
    assert not (tmp_path / "image").exists()


@pytest.mark.parametrize(
    "job_dir",
    ["/w/job", "/w/job dir", "/w/$(touch PWNED)", "/w/`touch PWNED`", "/w/'; touch PWNED; '", "/w/x\ntouch PWNED"],
)
def test_submission_writes_the_command_file_and_submits_without_injection(tmp_path, shell, job_dir):
    job_dir = str(tmp_path) + job_dir
    connector = _connector(tmp_path, "generic", runtime="none")
    command_file = f"{job_dir}/.xffl-job-x.sh"
    script = connector.job_script(command_file)
    words = connector.submission(script, COMMAND, command_file, "/federation/train_x/0.0", job_dir, None)
    proc = subprocess.run(
        ["sh", "-c", " ".join(words)], cwd=tmp_path, env=shell, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "4242", proc.stderr
    assert not list(tmp_path.rglob("PWNED"))
    assert Path(command_file).read_text() == COMMAND
    assert (tmp_path / "submitted.sh").read_text() == script
    args = (tmp_path / "sbatch-args").read_text().split("\0")
    assert f"--chdir={job_dir}" in args and "--account=proj_x" in args


def test_setup_lines_are_shell_by_design(tmp_path, shell):
    """The README says so: `setup` is the one place where the operator writes shell."""
    command_file = str(tmp_path / ".xffl-job-x.sh")
    Path(command_file).write_text('echo "$FROM_SETUP" > "$XFFL_TEST_DIR/ran"\n')
    proc = _run(_connector(tmp_path, "generic", runtime="none").job_script(command_file), tmp_path, shell)
    assert proc.returncode == 0 and (tmp_path / "ran").read_text() == "1\n"
    assert shlex.split("module load cuda")  # the setup line above is plain shell
