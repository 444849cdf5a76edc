"""What the plan's schema generates: the roles' nested argument specs, the field table, the files.

Everything here is derived from :mod:`llmfleet.plan_schema` (the one owner of the plan's rules) and
written by ``tools/plan.py --write-schema``; a unit test keeps the written files current.
"""

from __future__ import annotations

import json
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel

from .plan_schema import CROSS_FIELD_RULES, Plan, PlanDriver, PlanRuntime, json_schema, json_schema_text

# -- generated from the model: the roles' nested argument specs ---------------------------------------------

_SCALARS = {str: "str", int: "int", float: "float", bool: "bool"}


def _strip(tp: Any) -> tuple[Any, bool]:
    """The type without Annotated and None, and whether None was allowed."""
    nullable = False
    while True:
        origin = typing.get_origin(tp)
        if origin is Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (Union, types.UnionType) and type(None) in typing.get_args(tp):
            rest = [a for a in typing.get_args(tp) if a is not type(None)]
            nullable = True
            tp = rest[0] if len(rest) == 1 else Union[tuple(rest)]  # noqa: UP007
        else:
            return tp, nullable


def _spec(tp: Any) -> dict[str, Any]:
    tp, _ = _strip(tp)
    origin = typing.get_origin(tp)
    if origin is Literal:
        values = list(typing.get_args(tp))
        return {"type": _SCALARS[type(values[0])], "choices": values}
    if origin is list:
        elem = _spec(typing.get_args(tp)[0])
        out: dict[str, Any] = {"type": "list", "elements": elem["type"]}
        if elem["type"] != "list":  # Ansible checks one level of elements: a list of lists is left open below
            out.update({k: v for k, v in elem.items() if k in ("choices", "options")})
        return out
    if origin is dict or tp is dict:
        return {"type": "dict"}
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return {"type": "dict", "options": argument_options(tp)}
    if tp in _SCALARS:
        return {"type": _SCALARS[tp]}
    return {"type": "raw"}


def argument_options(model: type[BaseModel]) -> dict[str, Any]:
    """An Ansible argument spec's ``options`` for ``model``: its fields, their types and which are required
    (a field that may be None is not required: Ansible takes None for absent)."""
    options: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        _, nullable = _strip(info.annotation)
        spec = _spec(info.annotation)
        if info.is_required() and not nullable:
            spec = {"type": spec["type"], "required": True, **{k: v for k, v in spec.items() if k != "type"}}
        if info.description:
            spec["description"] = [info.description]
        options[info.alias or name] = spec
    return options


#: the model each ``# plan schema: <part>`` marker of a role's argument spec stands for
SPEC_PARTS: dict[str, type[BaseModel]] = {"plan": Plan, "runtime": PlanRuntime, "driver": PlanDriver}
_BLOCK = re.compile(r"^(?P<indent> *)# plan schema: (?P<part>\w+)\b[^\n]*\n(?P<body>.*?)^(?P=indent)# end of plan schema\n",
                    re.MULTILINE | re.DOTALL)


def render_argument_specs(text: str) -> str:
    """``text`` (a role's meta/argument_specs.yml) with every ``# plan schema: <part>`` block regenerated."""
    import yaml

    class Dumper(yaml.SafeDumper):
        def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
            super().increase_indent(flow, False)  # yamllint: sequences indented under their key

    def block(m: re.Match[str]) -> str:
        part, indent = m["part"], m["indent"]
        if part not in SPEC_PARTS:
            raise ValueError(f"# plan schema: {part}: expected one of {', '.join(SPEC_PARTS)}")
        dumped = yaml.dump({"options": argument_options(SPEC_PARTS[part])}, Dumper=Dumper, sort_keys=False, width=110,
                           default_flow_style=False, allow_unicode=True)
        body = "".join(f"{indent}{line}\n" if line else "\n" for line in dumped.splitlines())
        head = m.group(0).splitlines()[0]
        return f"{head}\n{body}{indent}# end of plan schema\n"

    return _BLOCK.sub(block, text)


# -- generated from the model: the field table ---------------------------------------------------------------

def _resolve(node: dict[str, Any], defs: Mapping[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        node = defs[node["$ref"].rsplit("/", 1)[1]]
    return node


def _type_of(node: dict[str, Any], defs: Mapping[str, Any]) -> tuple[str, dict[str, Any] | None, bool]:
    """A short type name, the object node to descend into (or None), and whether null is allowed."""
    node = _resolve(node, defs)
    variants = node.get("anyOf")
    if variants:
        kept = [v for v in variants if v.get("type") != "null"]
        name, child, _ = _type_of(kept[0], defs) if len(kept) == 1 else (" or ".join(_type_of(v, defs)[0] for v in kept), None, False)
        return name, child, len(kept) < len(variants)
    if "const" in node:
        return f"{json.dumps(node['const'])}", None, False
    if "enum" in node:
        return "one of " + ", ".join(json.dumps(v) for v in node["enum"]), None, False
    kind = node.get("type")
    if kind == "array":
        name, child, _ = _type_of(node.get("items", {}), defs)
        return f"list of {name}", child, False
    if kind == "object" and "properties" in node:
        return "object", node, False
    if kind == "object":
        extra = node.get("additionalProperties")
        if isinstance(extra, dict) and extra:
            name, child, _ = _type_of(extra, defs)
            return f"map of {name}", child, False
        return "map", None, False
    return {"string": "string", "integer": "integer", "number": "number", "boolean": "boolean"}.get(str(kind), "any"), None, False


def _rules_of(node: dict[str, Any], defs: Mapping[str, Any]) -> str:
    node = _resolve(node, defs)
    for v in node.get("anyOf", []):
        if v.get("type") != "null":
            node = _resolve(v, defs)
    if node.get("type") == "array" and "minItems" not in node and "maxItems" not in node:
        node = _resolve(node.get("items", {}), defs)
        for v in node.get("anyOf", []):
            if v.get("type") != "null":
                node = _resolve(v, defs)
    out = []
    for key, label in (("pattern", "matches"), ("minimum", "≥"), ("exclusiveMinimum", ">"), ("maximum", "≤"),
                       ("minLength", "length ≥"), ("maxLength", "length ≤"), ("minItems", "items ≥")):
        if key in node:
            value = node[key]
            out.append(f"{label} `{value}`" if key == "pattern" else f"{label} {value}")
    return "; ".join(out)


def _rows(node: dict[str, Any], path: str, defs: Mapping[str, Any]) -> list[str]:
    rows = []
    required = set(node.get("required", []))
    for name, prop in node.get("properties", {}).items():
        where = f"{path}.{name}" if path else name
        kind, child, nullable = _type_of(prop, defs)
        if nullable:
            kind += " or null"
        description = prop.get("description") or _resolve(prop, defs).get("description", "")
        if child is not None and description == child.get("description"):
            description = description.split("\n")[0]
        cells = [f"`{where}`", kind, "yes" if name in required else "no", _rules_of(prop, defs), " ".join(description.split())]
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        if child is not None:
            suffix = "[]" if kind.startswith("list of") else ".<key>" if kind.startswith("map of") else ""
            rows.extend(_rows(child, where + suffix, defs))
    return rows


def fields_markdown() -> str:
    """docs/plan-fields.md: every field of the plan, its type, whether it is required and its rules."""
    schema = json_schema()
    defs = schema.get("$defs", {})
    lines = [
        "# The plan's fields",
        "",
        "Generated from `tools/llmfleet/plan_schema.py` by `tools/plan.py --write-schema` (a unit test keeps it",
        "current); the same model gives `docs/plan.schema.json` and the roles' argument specs. `[]` is an item",
        "of a list, `.<key>` a value of a map. Rules across fields:",
        "",
        *[f"- {rule}" for rule in CROSS_FIELD_RULES],
        "",
        "| field | type | required | rules | description |",
        "|---|---|---|---|---|",
        *_rows(schema, "", defs),
    ]
    return "\n".join(lines) + "\n"


def generated_files(repo: Path) -> dict[Path, str]:
    """Every file the model generates, with the content it must have: the JSON Schema, the field table and
    each role's argument spec that carries a ``# plan schema`` block."""
    out = {repo / "docs" / "plan.schema.json": json_schema_text(), repo / "docs" / "plan-fields.md": fields_markdown()}
    for spec in sorted(repo.glob("roles/*/meta/argument_specs.yml")):
        text = spec.read_text(encoding="utf-8")
        if _BLOCK.search(text):
            out[spec] = render_argument_specs(text)
    return out


def write_generated(repo: Path) -> list[Path]:
    """Write the generated files that are not current; the paths written."""
    written = []
    for path, text in generated_files(repo).items():
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
            written.append(path)
    return written
