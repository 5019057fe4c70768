"""The xffl-cwl image: built by containers/build.sh from this checkout (scripts/install.sh does it), what it
carries, its Apptainer recipes (Apptainer cannot be installed here, so their structure is checked), and the
provenance a tool records from inside it."""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from conftest import REPO
from xffl_cwl import __version__
from xffl_cwl.contract.records import ContainerRecord
from xffl_cwl.learning.provenance import current_container

IMAGE = f"localhost/xffl-cwl:{__version__}"
RECIPES = {"client.def": ("train", f"xffl-cwl-{__version__}-cuda.tar"), "aggregator.def": ("aggregate", f"xffl-cwl-{__version__}.tar")}  # fmt: skip


def _podman(*args: str) -> str:
    return subprocess.run(["podman", *args], capture_output=True, text=True, check=True).stdout.strip()


def test_the_image_is_this_checkout_and_the_build_is_cached():
    """install.sh built the image; built again from the same files it is kept (inputs digest unchanged)."""
    proc = subprocess.run(
        ["bash", str(REPO / "containers" / "build.sh"), "--no-smoke"], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"build.sh: {IMAGE} is up to date (inputs sha256:" in proc.stderr, proc.stderr
    image_id = _podman("image", "inspect", "--format", "{{.Id}}", IMAGE)
    assert proc.stdout.strip() == f"{IMAGE} sha256:{image_id}"
    labels = json.loads(_podman("image", "inspect", "--format", "{{json .Labels}}", IMAGE))
    assert labels["org.opencontainers.image.version"] == __version__ and labels["org.xffl-cwl.variant"] == "cpu"
    assert re.search(r"inputs (sha256:[0-9a-f]{64})", proc.stderr)[1] == labels["org.xffl-cwl.inputs"]


def test_the_image_carries_the_tested_versions_and_runs_with_no_network():
    """The image's Python packages are those this suite runs with; it knows its own identity."""
    import peft
    import safetensors
    import torch
    import transformers

    script = (
        "import json, peft, safetensors, torch, transformers, xffl_cwl;"
        "print(json.dumps([xffl_cwl.__version__, torch.__version__, transformers.__version__, peft.__version__,"
        " safetensors.__version__, open('/etc/xffl-cwl/image.json').read()]))"
    )
    out = _podman("run", "--rm", "--network=none", IMAGE, "python", "-c", script)
    *versions, identity = json.loads(out.splitlines()[-1])
    host = [__version__, torch.__version__, transformers.__version__, peft.__version__, safetensors.__version__]
    assert versions == host
    identity = json.loads(identity)
    assert identity["image"] == IMAGE and identity["version"] == __version__
    assert identity["inputs"] == _podman(
        "image", "inspect", "--format", '{{index .Labels "org.xffl-cwl.inputs"}}', IMAGE
    )
    assert (
        _podman("image", "inspect", "--format", "{{json .Config.Entrypoint}}", IMAGE) == '["/usr/bin/tini","-g","--"]'
    )


def test_build_script_refuses_bad_arguments_in_one_line():
    for args, message in [(["--variant", "gpu"], "--variant must be cpu, cuda or rocm, not gpu"), (["--fast"], "unknown argument --fast")]:  # fmt: skip
        proc = subprocess.run(["bash", str(REPO / "containers" / "build.sh"), *args], capture_output=True, text=True)
        assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
            f"build.sh: error: {message}" + (" (see --help)" if "unknown" in message else "")
        ]


def _sections(text: str) -> dict[str, str]:
    parts = re.split(r"^%(\w+)\s*$", text, flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts), 2)}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_apptainer_recipes_take_the_built_image_as_it_is(name):
    """Each SIF is made from the OCI archive build.sh saves (docker-archive bootstrap): nothing installed again."""
    command, archive = RECIPES[name]
    text = (REPO / "containers" / name).read_text()
    header = text.split("\n%", 1)[0]
    assert re.search(r"^Bootstrap: docker-archive$", header, re.M) and re.search(
        r"^From: \{\{ archive \}\}$", header, re.M
    )
    sections = _sections(text)
    assert sections["arguments"].split() == [f"archive={archive}"]
    assert "post" not in sections and "files" not in sections, "the image's bits come from the archive only"
    assert f"org.opencontainers.image.version {__version__}" in sections["labels"]
    assert "export PATH=/opt/xffl-cwl/bin:$PATH" in sections["environment"]
    assert "HF_HUB_OFFLINE=1" in sections["environment"]
    assert "set -eu" in sections["test"] and f"xffl-cwl {command} --help" in sections["test"]
    assert f"apptainer build --build-arg archive=DIR/{archive}" in sections["help"]


def test_containerfile_installs_offline_from_a_bound_wheelhouse():
    text = (REPO / "containers" / "Containerfile").read_text()
    assert "RUN --mount=type=bind,source=wheels,target=/tmp/wheels" in text and "--no-index" in text
    assert not re.search(r"^(COPY|ADD) ", text, re.M), "no layer may keep the wheels"
    assert 'ENTRYPOINT ["/usr/bin/tini", "-g", "--"]' in text
    build = (REPO / "containers" / "build.sh").read_text()
    assert "--network none" in build and "debootstrap --variant=minbase" in build


def test_provenance_from_the_job_the_image_or_nothing(tmp_path, monkeypatch):
    for name in ("XFFL_CONTAINER_RUNTIME", "XFFL_CONTAINER_IMAGE", "XFFL_CONTAINER_DIGEST"):
        monkeypatch.delenv(name, raising=False)
    missing = tmp_path / "none.json"
    assert current_container(missing) == ContainerRecord("none", "none", "none", "none")
    baked = tmp_path / "image.json"
    baked.write_text(json.dumps({"image": "localhost/xffl-cwl:0.1.0", "inputs": "sha256:" + "a" * 64}))
    # started by a CWL runner: only the image's own file speaks
    assert current_container(baked) == ContainerRecord(
        "unknown", "localhost/xffl-cwl:0.1.0", "unknown", "sha256:" + "a" * 64
    )
    # started by a SLURM template, which says which image and digest
    monkeypatch.setenv("XFFL_CONTAINER_RUNTIME", "podman")
    monkeypatch.setenv("XFFL_CONTAINER_IMAGE", "localhost/xffl-cwl:0.1.0")
    monkeypatch.setenv("XFFL_CONTAINER_DIGEST", "sha256:" + "b" * 64)
    assert current_container(baked) == ContainerRecord(
        "podman", "localhost/xffl-cwl:0.1.0", "sha256:" + "b" * 64, "sha256:" + "a" * 64
    )
    # hostile environment values never reach a record as they are
    monkeypatch.setenv("XFFL_CONTAINER_IMAGE", "img\nwith newline")
    monkeypatch.setenv("XFFL_CONTAINER_DIGEST", "x" * 600)
    record = current_container(baked)
    assert record.image == "localhost/xffl-cwl:0.1.0" and record.digest == "unknown"
    baked.write_bytes(b"\xff\xfe{not json")
    assert current_container(baked).build == "none"
