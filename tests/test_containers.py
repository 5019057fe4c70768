"""The Apptainer recipes (Apptainer cannot be installed here, so their structure is what is checked)."""

from __future__ import annotations

import re

import pytest

from conftest import REPO
from xffl_cwl import __version__

RECIPES = {"client.def": "train", "aggregator.def": "aggregate"}


def _sections(text: str) -> dict[str, str]:
    parts = re.split(r"^%(\w+)\s*$", text, flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts), 2)}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_structure(name):
    text = (REPO / "containers" / name).read_text()
    header = text.split("\n%", 1)[0]
    assert re.search(r"^Bootstrap: docker$", header, re.M) and re.search(r"^From: \S+:\S+$", header, re.M)
    sections = _sections(text)
    for section in ("labels", "help", "files", "environment", "post", "test"):
        assert section in sections, f"{name} lacks %{section}"
    assert f"org.opencontainers.image.version {__version__}" in sections["labels"]
    # this checkout's package is copied in and installed, and its version is asserted
    for path in ("pyproject.toml", "xffl_cwl", "streamflow_plugins", "cwl", "slurm"):
        assert re.search(rf"^\s+{path} /opt/src/xffl-cwl/{path}$", sections["files"], re.M), path
    assert "pip install --no-cache-dir /opt/src/xffl-cwl" in sections["post"]
    assert f"__version__ == '{__version__}'" in sections["post"]
    assert "set -eu" in sections["post"] and "set -eu" in sections["test"]
    assert f"xffl-cwl {RECIPES[name]} --help" in sections["test"]
    assert "HF_HUB_OFFLINE=1" in sections["environment"]
    assert "apptainer build" in sections["help"]


def test_client_keeps_the_gpu_torch_and_aggregator_takes_cpu_torch():
    client = (REPO / "containers" / "client.def").read_text()
    aggregator = (REPO / "containers" / "aggregator.def").read_text()
    assert "nvidia/pytorch" in client and "torch==" not in _sections(client)["post"]
    assert "download.pytorch.org/whl/cpu" in aggregator and '"torch==2.13.0"' in aggregator
