"""The hand-written CWL tools: valid, documented, and each runs on its own under cwltool (cwltest suite)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from conftest import REPO

TOOLS = sorted((REPO / "cwl" / "tools").glob("*.cwl"))


@pytest.mark.parametrize("tool", TOOLS, ids=[t.name for t in TOOLS])
def test_tool_is_valid_and_documented(tool):
    proc = subprocess.run([sys.executable, "-m", "cwltool", "--validate", str(tool)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    doc = YAML(typ="safe").load(tool.read_text())
    assert doc["cwlVersion"] == "v1.2" and doc["class"] == "CommandLineTool"
    for section in ("inputs", "outputs"):
        for name, param in doc[section].items():
            assert isinstance(param, dict) and param.get("type"), f"{tool.name} {name} is untyped"
            assert param.get("label"), f"{tool.name} {section}.{name} has no label"
    assert "DockerRequirement" in doc["hints"] and "ResourceRequirement" in doc["hints"]
    env = doc["requirements"]["EnvVarRequirement"]["envDef"]
    assert env["HF_HUB_OFFLINE"] == "1"
    assert any(isinstance(p, dict) and p.get("type") == "File" for p in doc["outputs"].values())


@pytest.fixture(scope="module")
def suite():
    """cwl/ with its test data (cwl/tests/prepare.sh), made once, in a folder the facility users can read."""
    root = Path(tempfile.mkdtemp(prefix="xffl-cwltest-", dir="/var/tmp"))
    root.chmod(0o755)
    try:
        shutil.copytree(REPO / "cwl", root / "cwl", ignore=shutil.ignore_patterns("data"))
        subprocess.run(["bash", str(root / "cwl" / "tests" / "prepare.sh")], check=True, capture_output=True)
        yield root / "cwl"
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _cwltest(command: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _passed(proc: subprocess.Popen, what: str) -> None:
    try:
        out, _ = proc.communicate(timeout=900)
    finally:
        proc.kill()
    assert proc.returncode == 0 and "All tests passed" in out, f"{what}: {out[-4000:]}"


IN_THE_IMAGE_SKIPS = "train_lora,train_failed,example_finetune_evaluate"  # the same tools as the tests kept


def test_cwltest_suite_runs_every_tool_and_the_example_bare_and_each_tool_in_the_image(suite, facilities):
    """The whole suite with --no-container (the installed xffl-cwl), and at the same time one test of each
    tool (train, aggregate, evaluate) with containers on: cwltool --podman runs it in the image
    containers/build.sh made (DockerRequirement), as a login user with rootless podman (cwltool's podman
    mode needs a non-root user). Nothing is left behind."""
    user = facilities["by_name"]["leonardo"]["username"]
    home = Path(facilities["by_name"]["leonardo"]["home"])
    env_bin = Path(facilities["python_env"]) / "bin"
    mine = suite.parent / "as-user"
    shutil.copytree(suite, mine)
    subprocess.run(["chown", "-R", f"{user}:", str(mine)], check=True)
    before = _containers(user)
    bare = _cwltest(
        [
            sys.executable,
            "-m",
            "cwltest",
            "--test",
            "tests.yml",
            "--tool",
            "cwltool",
            "-j",
            "2",
            "--",
            "--no-container",
        ],
        suite,
    )
    podman = _cwltest(
        [
            "runuser", "-u", user, "--", "env", "-i", f"HOME={home}", f"PATH={env_bin}:/usr/bin:/bin",
            str(env_bin / "cwltest"), "--test", "tests.yml", "--tool", "cwltool", "-j", "2",
            "-S", IN_THE_IMAGE_SKIPS, "--", "--podman",
        ],
        mine,
    )  # fmt: skip
    try:
        _passed(bare, "cwltool --no-container")
    finally:
        _passed(podman, "cwltool --podman")
    assert _containers(user) == before, "cwltool left containers behind"


def _containers(user: str) -> list[str]:
    proc = subprocess.run(
        ["runuser", "-u", user, "--", "podman", "ps", "--all", "--quiet"],
        cwd="/", capture_output=True, text=True, check=True,
    )  # fmt: skip
    return proc.stdout.split()
