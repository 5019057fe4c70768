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
    assert script.rstrip().splitlines()[-1].endswith(COMMAND), "the job ends by running the command file"
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
