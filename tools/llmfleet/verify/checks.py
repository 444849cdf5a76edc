"""One row per check: name, measured, target, verdict. Only ``fail`` misses a target."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any


class Verdict(enum.StrEnum):
    PASS = "pass"
    FAIL = "fail"  # a target missed (exit 2) or, with an error, what could not be measured
    WARN = "warn"  # worth a look; never changes the exit code
    INFO = "info"  # measured, no target


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    measured: float | int | str | None
    target: str | None
    verdict: Verdict
    unit: str = ""
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "measured": self.measured,
            "target": self.target,
            "verdict": str(self.verdict),
            "unit": self.unit,
            "detail": self.detail,
        }


def at_least(name: str, measured: float | int, target: float | int | None, unit: str = "", detail: str = "") -> Check:
    if target is None:
        return Check(name, measured, None, Verdict.INFO, unit, detail)
    verdict = Verdict.PASS if measured >= target else Verdict.FAIL
    return Check(name, measured, f">= {target:g}", verdict, unit, detail)


def at_most(name: str, measured: float | int, target: float | int | None, unit: str = "", detail: str = "") -> Check:
    if target is None:
        return Check(name, measured, None, Verdict.INFO, unit, detail)
    verdict = Verdict.PASS if measured <= target else Verdict.FAIL
    return Check(name, measured, f"<= {target:g}", verdict, unit, detail)


def agrees(name: str, server: float | None, client: int, detail: str, *, shared: bool = False) -> Check:
    """A server counter's delta over the load against the client's own count: they must be equal.

    Not published: warn (nothing to compare). With ``shared`` (other clients may use the server), a
    delta *larger* than the client's count is other traffic and only warns; fewer tokens counted by
    the server than the client received is always a failure.
    """
    if server is None:
        return Check(name, None, f"= {client}", Verdict.WARN, "tokens", "not published by the server")
    measured: float | int = int(server) if float(server).is_integer() else server
    if measured == client:
        return Check(name, measured, f"= {client}", Verdict.PASS, "tokens", detail)
    if shared and measured > client:
        return Check(name, measured, f"= {client}", Verdict.WARN, "tokens", detail + " (other traffic on a shared server)")
    why = " (other traffic? pass --shared-server if the server is in use)" if measured > client else " (the server counted fewer)"
    return Check(name, measured, f"= {client}", Verdict.FAIL, "tokens", detail + why)
