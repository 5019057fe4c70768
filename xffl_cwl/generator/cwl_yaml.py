"""Turn cwl-utils' `save()` output into the CWL a person would write, and dump it with ruamel.yaml.

`save()` emits every list of ids as a list of objects and orders keys by the schema; people
write maps keyed by id, shorthand like `model: Directory`, and read top to bottom. The content
does not change, only its shape.
"""

from __future__ import annotations

import io
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq

DOCUMENT_ORDER = (
    "cwlVersion",
    "class",
    "label",
    "doc",
    "$namespaces",
    "requirements",
    "hints",
    "inputs",
    "outputs",
    "steps",
)
PARAMETER_ORDER = ("type", "label", "doc", "default", "outputSource", "linkMerge", "pickValue")
STEP_ORDER = ("label", "doc", "run", "when", "in", "out", "requirements", "hints")
STEP_INPUT_ORDER = ("source", "linkMerge", "pickValue", "default", "valueFrom")
LOOP_ORDER = ("loopWhen", "loop", "outputMethod")


def _ordered(data: dict[str, Any], order: tuple[str, ...]) -> CommentedMap:
    out = CommentedMap()
    for key in order:
        if key in data:
            out[key] = data[key]
    for key in data:
        if key not in out:
            out[key] = data[key]
    return out


def _flow(items: list[Any]) -> CommentedSeq:
    seq = CommentedSeq(items)
    seq.fa.set_flow_style()
    return seq


def _by_id(items: list[dict[str, Any]], shape) -> CommentedMap:
    """A list of {id: x, ...} as a map x -> shape(rest)."""
    out = CommentedMap()
    for item in items:
        rest = {k: v for k, v in item.items() if k != "id"}
        out[item["id"]] = shape(rest)
    return out


def _parameter(rest: dict[str, Any]) -> Any:
    if set(rest) == {"type"}:
        return _type(rest["type"])
    return _ordered({**rest, "type": _type(rest["type"])} if "type" in rest else rest, PARAMETER_ORDER)


def _type(value: Any) -> Any:
    """`["null", X]` reads better as `X?`; other unions stay lists, in flow style."""
    if isinstance(value, list):
        if len(value) == 2 and value[0] == "null" and isinstance(value[1], str):
            return value[1] + "?"
        return _flow(value)
    return value


def _requirements(items: list[dict[str, Any]]) -> CommentedMap:
    out = CommentedMap()
    for item in items:
        body = {k: v for k, v in item.items() if k != "class"}
        if item["class"].endswith("Loop"):
            body = _ordered({**body, "loop": _by_id(body.get("loop", []), _step_input)}, LOOP_ORDER)
        out[item["class"]] = CommentedMap(body)
    return out


def _step_input(rest: dict[str, Any]) -> Any:
    if set(rest) == {"source"} and isinstance(rest["source"], str):
        return rest["source"]
    if set(rest) == {"loopSource"}:
        return rest["loopSource"]
    if isinstance(rest.get("source"), list):
        rest = {**rest, "source": _flow(rest["source"])}
    shaped = _ordered(rest, STEP_INPUT_ORDER)
    if set(rest) <= {"default", "valueFrom", "source"} and not any(isinstance(v, (dict, list)) for v in rest.values()):
        shaped.fa.set_flow_style()  # `facility: {default: leonardo}` on one line
    return shaped


def _step(rest: dict[str, Any]) -> CommentedMap:
    shaped: dict[str, Any] = dict(rest)
    shaped["in"] = _by_id(rest.get("in", []), _step_input)
    shaped["out"] = _flow(rest.get("out", []))
    for key in ("requirements", "hints"):
        if key in rest:
            shaped[key] = _requirements(rest[key])
    return _ordered(shaped, STEP_ORDER)


def tidy(saved: dict[str, Any]) -> CommentedMap:
    """Reshape one saved Workflow document."""
    doc: dict[str, Any] = {k: v for k, v in saved.items() if k != "id"}
    doc["inputs"] = _by_id(saved.get("inputs", []), _parameter)
    doc["outputs"] = _by_id(saved.get("outputs", []), _parameter)
    doc["steps"] = _by_id(saved.get("steps", []), _step)
    for key in ("requirements", "hints"):
        if key in saved:
            doc[key] = _requirements(saved[key])
    return _ordered(doc, DOCUMENT_ORDER)


def dump(document: Any, header: str = "") -> str:
    """YAML text with a stable layout; `header` lines become leading comments."""
    yaml = YAML()
    yaml.indent(mapping=2, sequence=4, offset=2)
    yaml.width = 4096
    buffer = io.StringIO()
    yaml.dump(document, buffer)
    prefix = "".join(f"# {line}".rstrip() + "\n" for line in header.splitlines())
    return prefix + buffer.getvalue()
