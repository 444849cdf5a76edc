"""Refusals that name the place, the value and what would be valid.

Every problem the evaluator finds becomes a :class:`Problem`; a refused plan raises
:class:`PlanRefused` carrying all of them, so an operator fixes a spec in one pass.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from pydantic import ValidationError


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


def from_validation_error(host: str, prefix: str, err: ValidationError) -> list[Problem]:
    """Turn pydantic's errors into Problems with dotted/indexed locations."""
    problems = []
    for e in err.errors(include_url=False):
        where = prefix
        for part in e["loc"]:
            where += f"[{part}]" if isinstance(part, int) else (f".{part}" if where else str(part))
        value = e.get("input")
        kind = e["type"]
        if kind == "extra_forbidden":
            message, valid = "unknown field", ""
        elif kind == "missing":
            message, valid, value = "required field is missing", "", None
        else:
            message, valid = e["msg"], ""
        problems.append(Problem(host=host, where=where, value=value, message=message, valid=valid))
    return problems
