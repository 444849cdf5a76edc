"""Render an :class:`~llmfleet.verify.results.Outcome`: a versioned JSON envelope, or a table.

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
from .results import Outcome

SCHEMA = "llmfleet.verify/1"

try:  # optional: the core runs without it
    from rich import box
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    HAVE_RICH = True
except ImportError:  # pragma: no cover - exercised by the stdlib-only subprocess test
    HAVE_RICH = False


def _plan(out: Outcome) -> dict[str, Any]:
    p = out.config.plan
    keys = ("model_key", "model_root", "revision", "accelerator", "kv_tokens", "kv_blocks", "kv_block_size", "decode_bound_tokens_per_s")
    facts: dict[str, Any] = {k: getattr(p, k) for k in keys if getattr(p, k) is not None}
    if p.kv_tokens is not None:
        facts["kv_estimate"] = p.kv_estimate
    if out.config.plan_max_model_len is not None:
        facts["max_model_len"] = out.config.plan_max_model_len
    return facts


def envelope(out: Outcome) -> dict[str, Any]:
    cfg = out.config
    spec = cfg.load
    load: dict[str, Any] | None = None
    target = out.target_level
    if target is not None:
        load = target.as_dict(spec.prompt_tokens, spec.output_tokens)
        del load["server"]  # in server.load_metrics
    targets = {k: getattr(cfg.targets, k) for k in cfg.targets.__dataclass_fields__ if getattr(cfg.targets, k) is not None}
    return {
        "schema": SCHEMA,
        "ok": out.exit_code == 0,
        "exit_code": int(out.exit_code),
        "run_id": out.run_id,
        "started_at": out.started_at,
        "duration_s": round(out.duration_s, 3),
        "instance": {"name": cfg.instance, "url": cfg.url, "model": out.model or cfg.model, "generation": cfg.generation},
        "targets": targets,
        "plan": _plan(out),
        "checks": [c.as_dict() for c in out.checks],
        "load": load,
        "levels": [lv.as_dict(spec.prompt_tokens, spec.output_tokens) for lv in out.levels],
        "sweep": out.sweep,
        "ladder": out.ladder,
        "history": out.history,
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


def write_text(path: str, text: str) -> None:
    """Write atomically (temp file in the same directory, then rename), mode 0644: a reader never sees half a file.

    The mode is set on the open file, never by path: verify runs as root, and a writer of the
    directory could swap the temporary name for a link to another file between the two calls."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent or Path("."))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            os.fchmod(f.fileno(), 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(out: Outcome, path: str) -> None:
    write_text(path, dumps(out))


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


def _ms(v: float | None) -> str:
    return "—" if v is None else f"{v * 1000:,.2f}"


def _latency_rows(out: Outcome) -> tuple[list[str], list[list[str]]]:
    head = ["latency (ms)", "mean", "p50", "p90", "p95", "p99", "max", "server mean", "server p50≈", "server p99≈"]
    rows: list[list[str]] = []
    lv = out.target_level
    if lv is None:
        return head, rows
    s = lv.summary
    hist = lv.server.get("histograms", {})
    for label, key, d in (("TTFT", "ttft_s", s.ttft), ("TPOT", "tpot_s", s.tpot), ("ITL", "itl_s", s.itl), ("E2EL", "e2el_s", s.e2el)):
        if d is None:
            continue
        h = hist.get(key, {})
        server = (h.get("mean"), h.get("p50_estimate"), h.get("p99_estimate"))
        rows.append([label, *(_ms(x) for x in (d.mean, d.p50, d.p90, d.p95, d.p99, d.max)), *(_ms(x) for x in server)])
    return head, rows


def _level_rows(out: Outcome) -> tuple[list[str], list[list[str]]]:
    head = ["concurrency", "phase", "requests", "output tok/s", "req/s"]
    head += ["TTFT p50", "TTFT p99", "TPOT p50", "ITL p99", "E2EL p50", "client CPU"]
    rows: list[list[str]] = []
    if len(out.levels) < 2:
        return head, rows
    for lv in sorted(out.levels, key=lambda x: x.concurrency):
        s = lv.summary

        def p(d: Distribution | None, q: str) -> str:
            return "—" if d is None else _ms(getattr(d, q))

        rows.append([
            str(lv.concurrency), lv.phase, f"{s.complete}/{s.planned}", f"{s.output_tokens_per_s:,.1f}", f"{s.requests_per_s:.3g}",
            p(s.ttft, "p50"), p(s.ttft, "p99"), p(s.tpot, "p50"), p(s.itl, "p99"), p(s.e2el, "p50"), f"{lv.client_cpu_share:.0%}",
        ])  # fmt: skip
    return head, rows


def _ladder_line(out: Outcome) -> str | None:
    if not out.ladder:
        return None
    parts = []
    for r in sorted(out.ladder, key=lambda x: x["prompt_tokens"]):
        if r["status"] == 200:
            parts.append(f"{r['prompt_tokens']} ok {r['latency_s']:.3g} s")
        else:
            parts.append(f"{r['prompt_tokens']} {'HTTP ' + str(r['status']) if r['status'] else 'no answer'}")
    return "context ladder (prompt tokens, 1 output token): " + ", ".join(parts)


LEGEND = (
    "TTFT: request sent → first content chunk · TPOT: (E2EL − TTFT) ÷ (output tokens − 1) · ITL: gaps between content chunks · "
    "E2EL: sent → last content chunk (vLLM's bench definitions; tokens from usage) · server ≈: from vLLM's histograms"
)


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
            f"{s.requests_per_s:.3g} requests/s; {s.complete} complete, {s.cut_short} cut short, {s.failed} failed "
            f"({s.refused} refused), {s.not_sent} not sent"
        )
    ladder = _ladder_line(out)
    if ladder:
        lines.append(ladder)
    if out.sweep:
        sw = out.sweep
        lines.append(
            f"sweep: concurrency {', '.join(map(str, sw['levels']))}; throughput stops growing at {sw['knee_concurrency']} "
            f"({sw['knee_output_tokens_per_s']:,.1f} output tokens/s, peak {sw['peak_output_tokens_per_s']:,.1f}); {sw['stopped']}"
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
    tables = [t for t in (_latency_rows(out), _level_rows(out)) if t[1]]
    verdict = {0: "all targets met", 1: "could not measure", 2: "target missed"}[int(out.exit_code)]
    final = f"result: {verdict} (exit {int(out.exit_code)})" + (f": {out.error}" if out.error else "")
    legend = LEGEND if out.load is not None else None
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
        for t_head, t_rows in tables:
            t = Table(box=box.SIMPLE)
            for i, h in enumerate(t_head):
                t.add_column(h, justify="left" if i == 0 else "right")
            for r in t_rows:
                t.add_row(*r)
            console.print(t)
        if legend:
            console.print(legend, style="dim", markup=False)
        console.print(final, style="green" if out.exit_code == 0 else "bold red", markup=False)
        return
    parts = ["\n".join(_summary_lines(out)), "", _plain_table(head, rows)]
    for t_head, t_rows in tables:
        parts += ["", _plain_table(t_head, t_rows)]
    if legend:
        parts += ["", legend]
    parts += ["", final]
    stream.write("\n".join(parts) + "\n")


class NullProgress:
    def start(self, total: int, label: str = "load") -> None:
        pass

    def advance(self, result: RequestResult) -> None:
        pass

    def stop(self) -> None:
        pass


class RichProgress:
    """A transient bar on stderr for each long step (ladder, each load level)."""

    def __init__(self) -> None:
        self._progress = Progress(
            TextColumn("{task.description}"),
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

    def start(self, total: int, label: str = "load") -> None:
        self._tokens = self._bad = 0
        self._progress.start()
        self._task = self._progress.add_task(label, total=total, detail="")

    def advance(self, result: RequestResult) -> None:
        self._tokens += result.output_tokens or 0
        self._bad += 0 if result.error is None and not result.cut_short else 1
        detail = f"{self._tokens:,} tokens" + (f", {self._bad} failed/cut short" if self._bad else "")
        self._progress.update(self._task, advance=1, detail=detail)

    def stop(self) -> None:
        if self._task is not None:
            self._progress.remove_task(self._task)
            self._task = None
        self._progress.stop()


def progress_for(stderr: TextIO, enabled: bool) -> RichProgress | NullProgress:
    if enabled and HAVE_RICH and stderr.isatty():
        return RichProgress()
    return NullProgress()
