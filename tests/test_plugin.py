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
    assert any(
        line.split()[:2] == ["xffl", "xffl-cwl"]
        and line.split()[-1] == "streamflow_plugins.xffl_facility.plugin.XfflPlugin"
        for line in plugins.stdout.splitlines()
    )
    extensions = _streamflow("ext", "list")
    assert any(
        line.split()[0] == "xffl-facility" and line.split()[-1] == "xffl"
        for line in extensions.stdout.splitlines()
        if line.strip()
    )
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
    with pytest.raises(WorkflowDefinitionException, match=r"deployment site: sshKey .*/nokey does not exist"):
        _connector(tmp_path, sshKey="nokey")
    with pytest.raises(WorkflowDefinitionException, match="unknown SLURM template preset 'leonard'"):
        _connector(tmp_path, template="leonard")
    (tmp_path / "job.sh").write_text("#!/bin/bash\necho no placeholder\n")
    with pytest.raises(WorkflowDefinitionException, match=r"job.sh has no \{\{streamflow_command\}\} placeholder"):
        _connector(tmp_path, template="job.sh")
    with pytest.raises(
        WorkflowDefinitionException,
        match=r"jobs run in singularity \(template leonardo\) but container\.image is not set",
    ):
        _connector(tmp_path, template="leonardo")
    connector = _connector(
        tmp_path,
        template="leonardo",
        container={"image": "/images/client.sif"},
        sbatch={"account": "p1", "partition": "boost_usr_prod"},
    )
    assert connector.flags == ["--account=p1", "--partition=boost_usr_prod"]
    assert connector.variables["container_image"] == "/images/client.sif"


def test_xffl_validate_reports_the_schema_error(tmp_path, demo_assets):
    from conftest import write_federation
    from xffl_cwl.federation import load_federation
    from xffl_cwl.generator import generate

    spec = load_federation(write_federation(tmp_path / "federation.yml", demo_assets, ["leonardo"]))
    generate(spec, tmp_path / "run")
    config = (tmp_path / "run" / "streamflow.yml").read_text()
    (tmp_path / "run" / "streamflow.yml").write_text(
        config.replace(
            "  leonardo:\n    type: local\n    config: {}",
            "  leonardo:\n    type: xffl-facility\n    config: {host: h, username: u, sbatch: {partiton: x}}",
        )
    )
    proc = run_cli("validate", tmp_path / "run")
    assert proc.returncode == 2
    assert "streamflow run --validate: Additional properties are not allowed ('partiton' was unexpected)" in proc.stderr


def test_streamflow_private_names_the_plugin_touches_are_still_there():
    """The connector overrides SSHContext._get_connection and sets SSHConnector._cls_context (see its docstring)."""
    import ast
    import inspect

    from streamflow.deployment.connector.ssh import SSHConnector, SSHContext

    from xffl_cwl.facility.ssh import ENCRYPTION_ALGS

    method = inspect.getsource(SSHContext._get_connection)
    assert inspect.iscoroutinefunction(SSHContext._get_connection)
    assert list(inspect.signature(SSHContext._get_connection).parameters) == ["self", "config"]
    assert "self._cls_context" in inspect.getsource(SSHConnector)
    # the options StreamFlow's own login uses, which the facility login must keep
    tree = ast.parse(inspect.cleandoc(method))
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "connect")
    keywords = {k.arg: k.value for k in call.keywords}
    assert tuple(ast.literal_eval(keywords["encryption_algs"])) == ENCRYPTION_ALGS
    assert ast.literal_eval(keywords["compression_algs"]) is None
    assert {"passphrase", "password", "tunnel", "client_keys", "connect_timeout"} <= set(keywords)


def test_schema_describes_exactly_the_facility_settings():
    from dataclasses import MISSING, fields

    from xffl_cwl.contract.facility import ContainerSettings, FacilityConfig, SbatchOptions, camel

    schema = json.loads(XfflFacilityConnector.get_schema())
    assert set(schema["properties"]) == {camel(f.name) for f in fields(FacilityConfig)}
    for f in fields(FacilityConfig):
        declared = schema["properties"][camel(f.name)].get("default")
        if declared is not None and f.default is not MISSING:
            assert declared == f.default, f.name
    assert set(schema["properties"]["sbatch"]["properties"]) == {camel(f.name) for f in fields(SbatchOptions)}
    assert set(schema["properties"]["container"]["properties"]) == {f.name for f in fields(ContainerSettings)}


def test_connector_keeps_streamflow_login_options(tmp_path):
    """Passphrase and password files, the cipher preference and the facility's known_hosts all reach asyncssh."""
    from xffl_cwl.facility.ssh import ENCRYPTION_ALGS, connect_options

    (tmp_path / "key").write_text("k")
    (tmp_path / "pass").write_text("secret phrase\n")
    (tmp_path / "kh").write_text("")
    connector = _connector(tmp_path, sshKey="key", sshKeyPassphraseFile="pass", knownHosts="kh")
    options = connect_options(connector.login, client_keys=["k"], timeout=7)
    assert options["passphrase"] == "secret phrase" and options["known_hosts"] == str(tmp_path / "kh")
    assert options["encryption_algs"] == list(ENCRYPTION_ALGS) and options["connect_timeout"] == 7
    assert connector._cls_context.login is connector.login
