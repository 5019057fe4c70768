"""The facts the layers share live in xffl_cwl/contract, and everything that spells them agrees.

The CWL tools are written by hand for people to read and reuse; this holds every input of theirs
to the settings tables (type, default, label, doc, flag). The strategy catalogue is held to its
implementations, the click options to the tables, and the packages to the one-way flow.
"""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from conftest import REPO
from xffl_cwl.contract.options import AggregateOptions, EvaluateOptions, TrainOptions, tool_params
from xffl_cwl.contract.params import Param
from xffl_cwl.contract.strategies import STRATEGIES

TOOLS = {
    "train.cwl": (
        TrainOptions,
        {"model", "change", "dataset", "facility", "round", "deadline", "nnodes", "nproc_per_node"},
    ),
    "aggregate.cwl": (
        AggregateOptions,
        {"global_model", "updates", "state", "round", "max_weights", "weights", "statuses", "left_out"},
    ),
    "evaluate.cwl": (EvaluateOptions, {"model", "dataset", "previous_history", "round"}),
}
CWL_TYPES = {
    "bool": "boolean?",
    "int": "int?",
    "float": "float?",
    "str": "string?",
    "names": "string?",
    "pair": "string?",
}


def _inputs(tool: str) -> dict:
    return YAML(typ="safe", pure=True).load((REPO / "cwl" / "tools" / tool).read_text())["inputs"]


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_every_cwl_input_is_the_table_setting(tool):
    cls, io = TOOLS[tool]
    inputs = _inputs(tool)
    table = {p.name: p for p in tool_params(cls)}
    assert set(inputs) == set(table) | io, f"{tool} inputs differ from the {cls.__name__} table"
    for name, p in table.items():
        spec = inputs[name]
        if p.kind == "choice":
            assert spec["type"] == {"type": "enum", "symbols": list(p.choices)}, name
            assert spec["default"] == p.default, name
        else:
            assert spec["type"] == CWL_TYPES[p.kind], name
            assert "default" not in spec, f"{name}: the tool's own default applies; the table holds it"
        assert spec["label"] == p.label, name
        assert spec.get("doc") == (p.help if p.doc else None), name
        assert spec["inputBinding"] == {"prefix": p.flag}, name


@pytest.mark.parametrize(
    ("command", "cls"), [("train", TrainOptions), ("aggregate", AggregateOptions), ("evaluate", EvaluateOptions)]
)
def test_click_options_are_the_table_settings(command, cls):
    from xffl_cwl.cli import cli

    options = {p.name: p for p in cli.commands[command].params}
    for p in tool_params(cls):
        option = options[p.name]
        assert option.opts == [p.flag]
        expected = p.shown_default if p.kind in ("names", "pair") else p.default
        assert option.default == expected, p.name


def test_strategy_catalogue_matches_its_implementations():
    from xffl_cwl.learning.aggregation.strategies import IMPLEMENTATIONS

    assert set(IMPLEMENTATIONS) == set(STRATEGIES)
    for name, cls in IMPLEMENTATIONS.items():
        assert cls.info is STRATEGIES[name]
        takes = set(inspect.signature(cls).parameters)
        assert takes == {"server_lr", *STRATEGIES[name].uses}, name
    choices = next(p for p in tool_params(AggregateOptions) if p.name == "strategy").choices
    assert choices == tuple(STRATEGIES)


def test_bounds_are_enforced_by_every_setting():
    for cls in (TrainOptions, AggregateOptions, EvaluateOptions):
        for p in tool_params(cls):
            if p.minimum is not None and p.kind in ("int", "float"):
                below = p.minimum - 1 if p.kind == "int" else p.minimum - 0.5
                with pytest.raises(ValueError):
                    p.check(below if not p.min_exclusive else p.minimum)
            if p.kind in ("int", "float") and p.default is not None:
                assert p.check(p.default) == p.default


def test_settings_reject_what_json_and_yaml_let_through():
    p = Param("x", "float", 1.0, "x", minimum=0, min_exclusive=True)
    for bad in (float("nan"), float("inf"), True, "1", 10**400):
        with pytest.raises(ValueError):
            p.check(bad)
    i = Param("n", "int", 1, "n", minimum=1)
    for bad in (1.5, True, 2**31, "3"):
        with pytest.raises(ValueError):
            i.check(bad)


LAYERS = {
    # package -> packages of xffl_cwl it must not import (the flow only goes one way)
    "contract": {"federation", "generator", "execution", "facility", "learning", "commands", "demo", "cli", "report"},
    "federation": {"generator", "execution", "learning", "commands", "demo", "cli"},
    "facility": {"generator", "execution", "learning", "commands", "demo", "cli"},
    "generator": {"execution", "learning", "commands", "demo", "cli"},
    "execution": {"learning", "commands", "demo", "cli", "report"},
    "learning": {"federation", "generator", "execution", "facility", "commands", "demo", "cli", "report"},
    # the report reads what a run left (through execution's readers of the run folder), and writes nothing back
    "report": {"federation", "generator", "learning", "facility", "commands", "demo", "cli"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("xffl_cwl."):
            names.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            names |= {a.name.split(".")[1] for a in node.names if a.name.startswith("xffl_cwl.")}
    return names


@pytest.mark.parametrize("package", sorted(LAYERS))
def test_no_module_reaches_back_up_the_flow(package):
    for path in (REPO / "xffl_cwl" / package).rglob("*.py"):
        wrong = _imports(path) & LAYERS[package]
        assert not wrong, f"{path.relative_to(REPO)} imports {sorted(wrong)}"


def test_everything_but_learning_works_without_torch():
    code = (
        "import sys\n"
        "import xffl_cwl.cli, xffl_cwl.contract.records, xffl_cwl.federation, xffl_cwl.generator\n"
        "import xffl_cwl.execution.supervisor, xffl_cwl.facility.preflight, xffl_cwl.learning.history\n"
        "import xffl_cwl.report.page, xffl_cwl.report.status, xffl_cwl.report.ro_crate\n"
        "import streamflow_plugins.xffl_facility.connector\n"
        "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
