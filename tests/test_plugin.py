"""The xffl-facility StreamFlow plugin: registered, schema-checked, and strict about its configuration."""

from __future__ import annotations

import json
import subprocess

import pytest
from streamflow.core.exception import WorkflowDefinitionException

from conftest import run_cli
from streamflow_plugins.xffl_facility.connector import XfflFacilityConnector


def _streamflow(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(["streamflow", *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_plugin_is_listed_by_streamflow():
    plugins = _streamflow("plugin", "list")
    assert plugins.returncode == 0
    assert any(line.split()[:2] == ["xffl", "xffl-cwl"] and line.split()[-1] == "streamflow_plugins.xffl_facility.plugin.XfflPlugin" for line in plugins.stdout.splitlines())
    extensions = _streamflow("ext", "list")
    assert any(line.split()[0] == "xffl-facility" and line.split()[-1] == "xffl" for line in extensions.stdout.splitlines() if line.strip())
    shown = _streamflow("ext", "show", "connector", "xffl-facility")
    assert shown.returncode == 0 and "host: string" in shown.stdout and "template: string" in shown.stdout


def test_schema_has_an_absolute_id_and_rejects_unknown_keys():
    schema = json.loads(XfflFacilityConnector.get_schema())
    assert schema["$id"].startswith("https://")
    assert schema["additionalProperties"] is False
    assert schema["properties"]["sbatch"]["additionalProperties"] is False


MINIMAL = """version: v1.0
workflows:
  w:
    type: cwl
    config: {file: tool.cwl, settings: inputs.yml}
    bindings:
      - step: /
        target: {deployment: site}
deployments:
  site:
    type: xffl-facility
    config:
      host: 127.0.0.1
      username: someone
      %s
"""
TOOL = "cwlVersion: v1.2\nclass: CommandLineTool\nbaseCommand: [true]\ninputs: []\noutputs: []\n"


@pytest.mark.parametrize(
    "line, complaint",
    [
        ("pollingIntervall: 2", "'pollingIntervall' was unexpected"),
        ("sbatch: {partiton: debug}", "'partiton' was unexpected"),
        ("container: {runtime: docker}", "'docker' is not one of"),
    ],
)
def test_misspelt_configuration_is_a_schema_error(tmp_path, line, complaint):
    (tmp_path / "streamflow.yml").write_text(MINIMAL % line)
    (tmp_path / "tool.cwl").write_text(TOOL)
    (tmp_path / "inputs.yml").write_text("{}\n")
    proc = _streamflow("run", "--validate", "streamflow.yml", cwd=tmp_path)
    assert proc.returncode != 0
    assert complaint in proc.stdout + proc.stderr


def _connector(tmp_path, **config) -> XfflFacilityConnector:
    return XfflFacilityConnector("site", str(tmp_path), host="127.0.0.1", username="someone", **config)


def test_connector_refuses_bad_configuration_with_one_clear_message(tmp_path):
    with pytest.raises(WorkflowDefinitionException, match="deployment site: sshKey .*/nokey does not exist"):
        _connector(tmp_path, sshKey="nokey")
    with pytest.raises(WorkflowDefinitionException, match="unknown SLURM template preset 'leonard'"):
        _connector(tmp_path, template="leonard")
    (tmp_path / "job.sh").write_text("#!/bin/bash\necho no placeholder\n")
    with pytest.raises(WorkflowDefinitionException, match=r"job.sh has no \{\{streamflow_command\}\} placeholder"):
        _connector(tmp_path, template="job.sh")
    with pytest.raises(WorkflowDefinitionException, match="jobs run in singularity \\(template leonardo\\) but container.image is not set"):
        _connector(tmp_path, template="leonardo")
    connector = _connector(tmp_path, template="leonardo", container={"image": "/images/client.sif"}, sbatch={"account": "p1", "partition": "boost_usr_prod"})
    assert connector.flags == ["--account=p1", "--partition=boost_usr_prod"]
    assert connector.variables["container_image"] == "/images/client.sif"


def test_xffl_validate_reports_the_schema_error(tmp_path, demo_assets):
    from conftest import write_federation
    from xffl_cwl.federation import load_federation
    from xffl_cwl.generator import generate

    spec = load_federation(write_federation(tmp_path / "federation.yml", demo_assets, ["leonardo"]))
    generate(spec, tmp_path / "run")
    config = (tmp_path / "run" / "streamflow.yml").read_text()
    (tmp_path / "run" / "streamflow.yml").write_text(config.replace("  leonardo:\n    type: local\n    config: {}", "  leonardo:\n    type: xffl-facility\n    config: {host: h, username: u, sbatch: {partiton: x}}"))
    proc = run_cli("validate", tmp_path / "run")
    assert proc.returncode == 2
    assert "streamflow run --validate: Additional properties are not allowed ('partiton' was unexpected)" in proc.stderr
