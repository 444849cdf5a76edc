"""What a run found: the outcome, the load at each concurrency level, and the progress it reports.

:mod:`llmfleet.verify.runner` fills them; ``report``, ``textfile`` and ``plot`` render an :class:`Outcome`.
"""

from __future__ import annotations

import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Protocol

from .checks import Check, Verdict
from .config import VerifyConfig
from .errors import ExitCode
from .metrics import LoadSummary, RequestResult


class Progress(Protocol):
    def start(self, total: int, label: str = "load") -> None: ...
    def advance(self, result: RequestResult) -> None: ...
    def stop(self) -> None: ...


@dataclass
class LevelRun:
    """The streaming load at one concurrency level."""

    concurrency: int
    phase: str  # "target" (the targets are judged here), "level" (--concurrency extra), "sweep"
    summary: LoadSummary
    results: list[RequestResult | None]
    client_cpu_s: float
    prompt_seed: int = 0  # the first load prompt's seed; the others follow it
    server: dict[str, Any] = field(default_factory=dict)  # counter deltas and histograms over the level

    @property
    def errors(self) -> list[tuple[str, int]]:
        return Counter(r.error for r in self.results if r is not None and r.error is not None).most_common()

    @property
    def client_cpu_share(self) -> float:
        d = self.summary.duration_s
        return self.client_cpu_s / d if d > 0 else 0.0

    def as_dict(self, prompt_tokens: int, output_tokens: int) -> dict[str, Any]:
        return {
            "concurrency": self.concurrency,
            "phase": self.phase,
            "requests": self.summary.planned,
            "prompt_tokens": prompt_tokens,
            "output_tokens": output_tokens,
            "prompt_seed": self.prompt_seed,
            **self.summary.as_dict(),
            "client_cpu_share": round(self.client_cpu_share, 4),
            "errors": [{"error": e, "count": n} for e, n in self.errors],
            "server": self.server,
        }


@dataclass
class Outcome:
    """Everything a run found; :mod:`llmfleet.verify.report` renders it."""

    config: VerifyConfig
    started_at: str
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    model: str | None = None
    checks: list[Check] = field(default_factory=list)
    levels: list[LevelRun] = field(default_factory=list)
    ladder: list[dict[str, Any]] = field(default_factory=list)
    sweep: dict[str, Any] | None = None
    history: dict[str, Any] | None = None
    server: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    duration_s: float = 0.0

    @property
    def target_level(self) -> LevelRun | None:
        return next((lv for lv in self.levels if lv.phase == "target"), None)

    @property
    def load(self) -> LoadSummary | None:
        """The figures at the target concurrency (the ones the targets are judged on)."""
        lv = self.target_level
        return None if lv is None else lv.summary

    @property
    def load_errors(self) -> list[tuple[str, int]]:
        lv = self.target_level
        return [] if lv is None else lv.errors

    @property
    def exit_code(self) -> ExitCode:
        if self.error is not None:
            return ExitCode.ERROR
        if any(c.verdict is Verdict.FAIL for c in self.checks):
            return ExitCode.TARGET_MISSED
        return ExitCode.OK
