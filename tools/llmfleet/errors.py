"""Refusals that name the place, the value and what would be valid.

Every problem the evaluator finds becomes a :class:`Problem`; a refused plan raises
:class:`PlanRefused` carrying all of them, so an operator fixes a spec in one pass.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from pydantic import BaseModel, ValidationError


def show(value: Any) -> str:
    """Render a value compactly for a message."""
    try:
        text = json.dumps(value, sort_keys=True, default=str, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


@dataclass(frozen=True)
class Problem:
    """One refusal (or warning): where, what was given, what is wrong, what would be valid."""

    host: str
    where: str
    value: Any
    message: str
    valid: str = ""
    severity: str = "error"  # "error" refuses the plan; "warning" is reported only

    def __str__(self) -> str:
        text = f"{self.host}: {self.where} = {show(self.value)}: {self.message}"
        if self.valid:
            text += f" (valid: {self.valid})"
        return text

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class LlmfleetError(Exception):
    """Base of every error llmfleet reports without a traceback."""


class PlanRefused(LlmfleetError):
    """The spec or the pins cannot give a valid plan."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class InputError(LlmfleetError):
    """A file or argument could not be read (missing file, bad YAML/JSON)."""


def _model_at(model: type[BaseModel] | None, loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that holds the field at ``loc`` (through lists, dicts and optionals)."""
    for part in loc:
        if model is None:
            return None
        if isinstance(part, int) or part not in model.model_fields:
            continue  # a list index or a dict key: the items' model is the one found by the field
        model = _field_model(model.model_fields[part].annotation)
    return model


def _field_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _field_model(arg)
        if found is not None:
            return found
    return None


def _union_tag(part: Any) -> bool:
    """A location part pydantic adds for a member of a union (``str``, ``int``, ``HardwareProfile``), not a field."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or part[:1].isupper() or "[" in part)


def _merge_unions(errors: list[Any]) -> list[Any]:
    """One problem per place for a value that fits no member of a union: the members' tags are
    dropped from the location; a member whose fields were checked (the value had its shape) wins
    over members of another shape; otherwise the members' messages are joined."""
    out: list[dict[str, Any]] = []
    for e in errors:
        loc = tuple(p for p in e["loc"] if not _union_tag(p))
        out.append(dict(e, loc=loc, tagged=len(loc) != len(e["loc"])))
    merged: list[dict[str, Any]] = []
    for e in out:
        n = len(e["loc"])
        if e["tagged"] and any(o is not e and o["tagged"] and len(o["loc"]) > n and o["loc"][:n] == e["loc"] for o in out):
            continue  # a deeper error of another member explains this place
        same = next((m for m in merged if m["tagged"] and e["tagged"] and m["loc"] == e["loc"]), None)
        if same is not None:
            same["msg"] = f"{same['msg']}; {e['msg'][0].lower()}{e['msg'][1:]}" if e["msg"] else same["msg"]
            same["type"] = "union"
            continue
        merged.append(e)
    return merged


def from_validation_error(
    host: str,
    prefix: str,
    err: ValidationError,
    model: type[BaseModel] | None = None,
    hints: dict[str, str] | None = None,
) -> list[Problem]:
    """Turn pydantic's errors into Problems with dotted/indexed locations.

    ``model`` (the validated class) lets an unknown field name the known ones; ``hints`` gives
    what is valid for a field (by its location without indices, e.g. ``runtime``)."""
    problems = []
    errors = _merge_unions(err.errors(include_url=False))
    for e in errors:
        where = prefix
        for part in e["loc"]:
            where += f"[{part}]" if isinstance(part, int) else (f".{part}" if where else str(part))
        value = e.get("input")
        kind = e["type"]
        hint = (hints or {}).get(".".join(str(p) for p in e["loc"] if not isinstance(p, int)), "")
        if kind == "extra_forbidden":
            holder = _model_at(model, tuple(e["loc"][:-1]))
            known = sorted(holder.model_fields) if holder is not None else []
            message, valid = "unknown field", ("known fields: " + ", ".join(known)) if known else ""
        elif kind == "missing":
            message, valid, value = "required field is missing", hint, None
        else:
            message, valid = e["msg"], hint
        problems.append(Problem(host=host, where=where, value=value, message=message, valid=valid))
    return problems
