"""The hand-written CWL tools: valid, documented, and each runs on its own under cwltool (cwltest suite)."""

from __future__ import annotations

import shutil
import subprocess
import sys

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


def test_cwltest_suite_runs_every_tool_and_the_example(tmp_path):
    suite = tmp_path / "cwl"
    shutil.copytree(REPO / "cwl", suite, ignore=shutil.ignore_patterns("data"))
    subprocess.run(["bash", str(suite / "tests" / "prepare.sh")], check=True, capture_output=True)
    proc = subprocess.run(
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
        cwd=suite,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "All tests passed" in proc.stdout + proc.stderr
