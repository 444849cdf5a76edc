"""Render an :class:`~llmfleet.verify.runner.Outcome`: a versioned JSON envelope, or a table.

``rich`` is optional (hosts have a bare Python): with it, a rich table and a progress bar on the
load; without it, a plain aligned table and no bar.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from .metrics import Distribution, RequestResult
from .runner import Outcome

SCHEMA = "llmfleet.verify/1"

try:  # optional: the core runs without it
    from rich import box
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    HAVE_RICH = True
except ImportError:  # pragma: no cover - exercised by the stdlib-only subprocess test
    HAVE_RICH = False


def _dist(d: Distribution | None) -> dict[str, Any] | None:
    return None if d is None else d.as_dict()


def envelope(out: Outcome) -> dict[str, Any]:
    cfg = out.config
    load: dict[str, Any] | None = None
    spec = cfg.load
    if out.load is not None:
        s = out.load
        load = {
            "concurrency": spec.concurrency,
            "requests": spec.requests,
            "prompt_tokens": spec.prompt_tokens,
            "output_tokens": spec.output_tokens,
            "sent": s.sent,
            "succeeded": s.succeeded,
            "complete": s.complete,
            "failed": s.failed,
            "cut_short": s.cut_short,
            "not_sent": s.not_sent,
            "duration_s": s.duration_s,
            "output_tokens_total": s.output_tokens,
            "prompt_tokens_total": s.prompt_tokens,
            "output_tokens_per_s": s.output_tokens_per_s,
            "requests_per_s": s.requests_per_s,
            "ttft_s": _dist(s.ttft),
            "tpot_s": _dist(s.tpot),
            "itl_s": _dist(s.itl),
            "e2el_s": _dist(s.e2el),
            "errors": [{"error": e, "count": n} for e, n in out.load_errors],
        }
    targets = {k: getattr(cfg.targets, k) for k in cfg.targets.__dataclass_fields__ if getattr(cfg.targets, k) is not None}
    return {
        "schema": SCHEMA,
        "ok": out.exit_code == 0,
        "exit_code": int(out.exit_code),
        "started_at": out.started_at,
        "instance": {"name": cfg.instance, "url": cfg.url, "model": out.model or cfg.model, "generation": cfg.generation},
        "targets": targets,
        "checks": [c.as_dict() for c in out.checks],
        "load": load,
        "server": out.server,
        "error": out.error,
    }


def _finite(v: Any) -> Any:
    """JSON has no NaN or infinity: those become null."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_finite(x) for x in v]
    return v


def dumps(out: Outcome) -> str:
    return json.dumps(_finite(envelope(out)), indent=2, allow_nan=False, default=str) + "\n"


def write_json(out: Outcome, path: str) -> None:
    """Write the envelope atomically (temp file + rename) so a reader never sees half a file."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent or Path("."))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(dumps(out))
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fmt(v: object) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        if v == 0 or abs(v) >= 100:
            return f"{v:,.1f}"
        return f"{v:.4g}" if abs(v) < 1 else f"{v:,.3g}" if abs(v) < 10 else f"{v:,.2f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _rows(out: Outcome) -> tuple[list[str], list[list[str]]]:
    head = ["check", "measured", "target", "verdict", "detail"]
    rows = []
    for c in out.checks:
        measured = _fmt(c.measured) + (f" {c.unit}" if c.unit and c.measured is not None and not isinstance(c.measured, str) else "")
        rows.append([c.name, measured, c.target or "—", str(c.verdict).upper(), c.detail])
    return head, rows


def _latency_rows(out: Outcome) -> tuple[list[str], list[list[str]]]:
    head = ["latency (ms)", "mean", "p50", "p95", "p99", "max", "server mean"]
    rows: list[list[str]] = []
    s = out.load
    if s is None:
        return head, rows
    hist = out.server.get("load_metrics", {}).get("histograms", {})

    def ms(v: float | None) -> str:
        return "—" if v is None else f"{v * 1000:,.2f}"

    for label, key, d in (("TTFT", "ttft_s", s.ttft), ("TPOT", "tpot_s", s.tpot), ("ITL", "itl_s", s.itl), ("E2EL", "e2el_s", s.e2el)):
        if d is None:
            continue
        server_mean = hist.get(key, {}).get("mean")
        rows.append([label, *(ms(x) for x in (d.mean, d.p50, d.p95, d.p99, d.max)), ms(server_mean)])
    return head, rows


def _summary_lines(out: Outcome) -> list[str]:
    cfg = out.config
    who = f"instance {cfg.instance} · " if cfg.instance else ""
    lines = [f"llmfleet verify · {who}{cfg.url} · model {out.model or cfg.model or '?'}"]
    if out.server.get("version"):
        lines[0] += f" · vLLM {out.server['version']}"
    s = out.load
    if s is not None:
        spec = cfg.load
        lines.append(
            f"load: {s.planned} requests × ({spec.prompt_tokens} prompt + {spec.output_tokens} output tokens), "
            f"concurrency {spec.concurrency}, {s.duration_s:.2f} s: {s.output_tokens_per_s:,.1f} output tokens/s, "
            f"{s.requests_per_s:.3g} requests/s; {s.complete} complete, {s.cut_short} cut short, {s.failed} failed, {s.not_sent} not sent"
        )
    return lines


def _plain_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [head, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render_human(out: Outcome, stream: TextIO | None = None, *, use_rich: bool | None = None) -> None:
    stream = stream or sys.stdout
    rich_ok = HAVE_RICH if use_rich is None else use_rich and HAVE_RICH
    head, rows = _rows(out)
    lat_head, lat_rows = _latency_rows(out)
    verdict = {0: "all targets met", 1: "could not measure", 2: "target missed"}[int(out.exit_code)]
    final = f"result: {verdict} (exit {int(out.exit_code)})" + (f": {out.error}" if out.error else "")
    if rich_ok:
        # logs (Ansible, CI) are not terminals: do not wrap the table at 80 columns there
        console = Console(file=stream, highlight=False, width=None if stream.isatty() else 160)
        for line in _summary_lines(out):
            console.print(line, markup=False)
        table = Table(box=box.SIMPLE_HEAVY)
        for h in head:
            table.add_column(h, justify="right" if h == "measured" else "left")
        styles = {"PASS": "green", "FAIL": "bold red", "WARN": "yellow", "INFO": "dim"}
        for r in rows:
            table.add_row(*r[:3], f"[{styles.get(r[3], '')}]{r[3]}[/]", r[4])
        console.print(table)
        if lat_rows:
            lat = Table(box=box.SIMPLE)
            for h in lat_head:
                lat.add_column(h, justify="left" if h.startswith("latency") else "right")
            for r in lat_rows:
                lat.add_row(*r)
            console.print(lat)
        console.print(final, style="green" if out.exit_code == 0 else "bold red", markup=False)
        return
    parts = ["\n".join(_summary_lines(out)), "", _plain_table(head, rows)]
    if lat_rows:
        parts += ["", _plain_table(lat_head, lat_rows)]
    parts += ["", final]
    stream.write("\n".join(parts) + "\n")


class NullProgress:
    def start(self, total: int) -> None:
        pass

    def advance(self, result: RequestResult) -> None:
        pass

    def stop(self) -> None:
        pass


class RichProgress:
    """A transient bar on stderr while the load runs."""

    def __init__(self) -> None:
        self._progress = Progress(
            TextColumn("load"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self._task: Any = None
        self._tokens = 0
        self._bad = 0

    def start(self, total: int) -> None:
        self._progress.start()
        self._task = self._progress.add_task("load", total=total, detail="")

    def advance(self, result: RequestResult) -> None:
        self._tokens += result.output_tokens or 0
        self._bad += 0 if result.error is None and not result.cut_short else 1
        detail = f"{self._tokens:,} tokens" + (f", {self._bad} failed/cut short" if self._bad else "")
        self._progress.update(self._task, advance=1, detail=detail)

    def stop(self) -> None:
        self._progress.stop()


def progress_for(stderr: TextIO, enabled: bool) -> RichProgress | NullProgress:
    if enabled and HAVE_RICH and stderr.isatty():
        return RichProgress()
    return NullProgress()
