"""Every SLURM preset renders into a batch script bash accepts, with the system's settings."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from xffl_cwl.contract.facility import ContainerSettings, SbatchOptions
from xffl_cwl.facility.templates import (
    TemplateError,
    effective_runtime,
    job_variables,
    load_template,
    parse_template,
    presets,
)

PRESETS = presets()

COMMAND = "bash /scratch/job/.xffl-job-xffl-train_x-0.0.sh"  # what the connector renders: the command is a file
NVIDIA = {"leonardo", "marenostrum5", "meluxina", "karolina", "vega", "deucalion", "discoverer"}


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("with_container", [True, False], ids=["container", "bare"])
def test_preset_renders_to_valid_bash(preset, with_container, tmp_path):
    template = load_template(preset, tmp_path)
    container = (
        ContainerSettings(image="/work/images/client.sif", bind=("/scratch/work", "/data"))
        if with_container
        else ContainerSettings(runtime="none")
    )
    script = template.render(
        COMMAND, job_variables(SbatchOptions(account="proj_x", time="02:00:00"), container, ("module load cuda",))
    )
    assert script.startswith("#!/bin/bash\n")
    sbatch = [line for line in script.splitlines() if line.startswith("#SBATCH ")]
    assert any(line.startswith("#SBATCH --job-name=") for line in sbatch)
    assert "#SBATCH --time=02:00:00" in sbatch and "#SBATCH --account=proj_x" in sbatch
    assert "{{" not in script and "{%" not in script
    assert "module load cuda" in script
    lines = script.rstrip().splitlines()
    if (
        with_container and effective_runtime(template, ContainerSettings()) != "none"
    ):  # in the background, so a signal's trap runs at once; the job's exit code is the command's
        assert lines[-1] == "wait $!" and lines[-2].endswith(f"{COMMAND} &"), lines[-2:]
    else:
        assert lines[-1].endswith(COMMAND), "the job ends by running the command file"
    path = tmp_path / f"{preset}.sh"
    path.write_text(script)
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    runtime = effective_runtime(template, ContainerSettings())
    if with_container and runtime != "none":
        exec_line = next(line for line in script.splitlines() if " exec " in line and not line.startswith("export"))
        assert exec_line.split()[exec_line.split().index("exec") - 1] == runtime
        assert "--bind /scratch/work --bind /data" in exec_line and " /work/images/client.sif bash " in exec_line
        assert ("--rocm" if preset == "lumi" else "--nv") in exec_line
        # what srun runs each worker in, for trainings on several nodes: the same words as the exec line
        export = next(line for line in script.splitlines() if line.startswith("export XFFL_WORKER_EXEC="))
        words = subprocess.run(
            ["bash", "-c", f'{export}\nprintf "%s\\n" $XFFL_WORKER_EXEC'], capture_output=True, text=True, check=True
        ).stdout.split()
        assert " ".join(words) in exec_line and words[-1] == "/work/images/client.sif", words
    if not with_container:
        assert " exec " not in script


@pytest.mark.parametrize("preset", PRESETS)
def test_the_world_of_a_training_is_what_the_job_asks_for(preset, tmp_path):
    """nodes x workers per node as the generator passes them to train (--nnodes, --nproc-per-node)
    equal what the rendered job asks SLURM for (--nodes, --ntasks-per-node): one worker per GPU."""
    from xffl_cwl.facility.templates import training_world

    template = load_template(preset, tmp_path)
    for sbatch in (
        SbatchOptions(),
        SbatchOptions(nodes=2, gpus_per_node=4),
        SbatchOptions(nodes=3, gpus_per_node=0, ntasks_per_node=2),
    ):
        script = template.render(COMMAND, job_variables(sbatch, ContainerSettings(runtime="none"), ()))
        asked = {
            line.split("=")[0].removeprefix("#SBATCH "): line.split("=", 1)[1]
            for line in script.splitlines()
            if line.startswith("#SBATCH --")
        }
        nodes, per_node = training_world(template, sbatch)
        assert (int(asked["--nodes"]), int(asked["--ntasks-per-node"])) == (nodes, per_node), (preset, sbatch)
        if sbatch.nodes == 2:
            assert (nodes, per_node) == (2, 4)  # 8 workers


@pytest.mark.parametrize("preset", sorted(set(PRESETS) - {"generic"}))
def test_system_presets_hold_their_defaults_but_no_account(preset):
    template = load_template(preset, Path("."))
    script = template.render("true", job_variables(SbatchOptions(), ContainerSettings(image="/i.sif"), ()))
    assert "--account" not in script, "accounts are per user, never a default"
    for option in ("--partition=", "--time=", "--gpus-per-node=", "--cpus-per-task="):
        assert f"#SBATCH {option}" in script
    if preset == "lumi":
        assert "MIOPEN_USER_DB_PATH" in script and "NCCL_SOCKET_IFNAME=hsn" in script
    else:
        assert preset in NVIDIA and "NCCL_IB_DISABLE=0" in script
    assert "srun" in script
    # a facility's own options replace the defaults
    custom = template.render(
        "true",
        job_variables(
            SbatchOptions(partition="mypart", qos="myqos", gpus_per_node=2), ContainerSettings(image="/i.sif"), ()
        ),
    )
    assert "#SBATCH --partition=mypart" in custom and "#SBATCH --gpus-per-node=2" in custom


def test_template_errors_name_the_problem(tmp_path):
    with pytest.raises(TemplateError, match="unknown SLURM template preset 'leonard'"):
        load_template("leonard", tmp_path)
    (tmp_path / "mine.sh").write_text("#!/bin/bash\n#SBATCH --time=1\nrun_it\n")
    with pytest.raises(TemplateError, match=r"has no \{\{streamflow_command\}\} placeholder"):
        load_template("mine.sh", tmp_path)
    with pytest.raises(TemplateError, match="not valid Jinja2"):
        parse_template("{% if %}{{ streamflow_command }}", "broken")
    with pytest.raises(TemplateError, match="cannot be read"):
        load_template("missing/template.sh", tmp_path)


def test_explicit_options_become_flags():
    flags = SbatchOptions(partition="p", gpus_per_node=4, extra=("--exclusive",)).flags()
    assert flags == ["--partition=p", "--gpus-per-node=4", "--exclusive"]


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("gpus", [0, 4])
def test_podman_runs_the_command_in_the_image_on_every_preset(preset, gpus, tmp_path):
    """runtime: podman on any preset: the template's apptainer options give way to podman's own, the
    job's binds become volumes, SLURM's and our variables are passed in, and the image's digest is
    taken for the records before the command runs (or the job stops with one line)."""
    template = load_template(preset, tmp_path)
    container = ContainerSettings(runtime="podman", image="localhost/xffl-cwl:0.1.0", bind=("/scratch/work", "/data"))
    script = template.render(COMMAND, job_variables(SbatchOptions(gpus_per_node=gpus), container, ()))
    path = tmp_path / "job.sh"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    last = script.rstrip().splitlines()[-2]
    words = last.split()
    start = words.index("podman")
    assert words[start : start + 3] == ["podman", "run", "--rm"]
    assert last.endswith(f"localhost/xffl-cwl:0.1.0 {COMMAND} &")
    # scancel signals the script, not the container: the trap stops the container by its name
    assert '--name="$XFFL_CONTAINER_NAME"' in words and "--sig-proxy=false" in words
    assert """trap 'podman stop --time 15 "$XFFL_CONTAINER_NAME" >/dev/null 2>&1; exit 143' TERM INT""" in script
    assert "--volume=/scratch/work:/scratch/work" in words and "--volume=/data:/data" in words
    assert "--env='SLURM_*'" in words and "--env='XFFL_*'" in words and '--workdir="$PWD"' in words
    assert "--nv" not in words and "--rocm" not in words and "--network=host" in words
    vendor = template.gpu_vendor
    if gpus and vendor == "nvidia":
        assert "--device=nvidia.com/gpu=all" in words
    elif gpus and vendor == "amd":
        assert "--device=/dev/kfd" in words and "--device=/dev/dri" in words
    else:
        assert not any(w.startswith("--device") for w in words)
    assert "podman image inspect --format '{{.Id}}' \"$XFFL_CONTAINER_IMAGE\"" in script
    assert "export XFFL_CONTAINER_RUNTIME=podman XFFL_CONTAINER_IMAGE=localhost/xffl-cwl:0.1.0" in script
    # each worker of a multi-node training runs in the same image, in the job's directory
    export = next(line for line in script.splitlines() if line.startswith("export XFFL_WORKER_EXEC="))
    shown = subprocess.run(
        ["bash", "-c", f'{export}\npython3 -c "import os, shlex; print(shlex.split(os.environ[\'XFFL_WORKER_EXEC\']))"'],
        capture_output=True, text=True, check=True, cwd=tmp_path,
    ).stdout  # fmt: skip
    assert f"'--workdir={tmp_path}'" in shown and shown.rstrip().endswith("'localhost/xffl-cwl:0.1.0']")


def test_set_container_options_are_kept_for_any_runtime(tmp_path):
    template = load_template("leonardo", tmp_path)
    container = ContainerSettings(runtime="podman", image="img:1", options=("--network=none", "--security-opt=x"))
    script = template.render(COMMAND, job_variables(SbatchOptions(), container, ()))
    last = script.rstrip().splitlines()[-2]
    assert "--network=none --security-opt=x" in last and "--network=host" not in last


def test_the_job_stops_with_one_line_when_the_runtime_or_the_image_is_missing(tmp_path):
    """The setup lines of a containerized job, run for real by bash: a runtime that is not there and an
    image that cannot be read stop the job with exit code 2 and one line naming it."""
    template = load_template("generic", tmp_path)
    for container, expected in [
        (ContainerSettings(runtime="singularity", image=str(tmp_path / "missing.sif")), "singularity is not found"),
        (
            ContainerSettings(runtime="podman", image="localhost/xffl-cwl:no-such-tag"),
            "no-such-tag is not in the podman",
        ),
    ]:
        script = template.render("echo ran", job_variables(SbatchOptions(), container, ()))
        env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}  # the real podman (scripts/facilities.sh install)
        proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
        assert proc.returncode == 2 and "ran" not in proc.stdout, (proc.stdout, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1 and expected in proc.stderr, proc.stderr
