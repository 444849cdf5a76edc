"""The outcome as one self-contained HTML page of inline SVG charts (stdlib only: hosts have no matplotlib).

Charts: the distribution (empirical CDF) of TTFT, TPOT, ITL and E2EL per concurrency level, with
the target level's p50/p90/p99 marked; output tokens/s and TTFT against concurrency when more than
one level was measured (the sweep); prompt latency against prompt length for the context ladder.
No script, no external resource: the file opens anywhere, offline.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

from .metrics import percentile
from .results import LevelRun, Outcome

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22")
CDF_POINTS = 200  # a CDF is drawn through this many quantiles, however many samples
W, H = 480, 280
LEFT, RIGHT, TOP, BOTTOM = 64, 20, 44, 46
#: inside each SVG, so a chart looks the same cut out of the page
SVG_STYLE = (
    "text{font:11px sans-serif;fill:#333}.t{font-size:13px;font-weight:600}.small{font-size:10px}"
    ".grid{stroke:#e5e5e5}.frame{fill:none;stroke:#999}.mark{stroke:#888;stroke-dasharray:4 3}"
)

Point = tuple[float, float]
Series = tuple[str, str, Sequence[Point]]  # label, colour, points


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    ticks = []
    v = first
    while v <= hi + step * 1e-9:
        ticks.append(round(v, 12))
        v += step
    return ticks


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.3g}"


def chart(
    title: str,
    series: Sequence[Series],
    x_label: str,
    y_label: str,
    *,
    x_log2: bool = False,
    markers: Sequence[tuple[float, str]] = (),
    y_range: tuple[float, float] | None = None,
) -> str:
    """One SVG line chart; ``markers`` are dashed vertical lines at x with a label."""
    pts = [p for _, _, ps in series for p in ps]
    if not pts:
        return ""
    fx = (lambda x: math.log2(x)) if x_log2 else (lambda x: x)
    xs = [fx(x) for x, _ in pts] + [fx(x) for x, _ in markers]
    x0, x1 = min(xs), max(xs)
    if x0 == x1:
        x0, x1 = x0 - 1, x1 + 1
    if not x_log2 and x0 >= 0:
        x0 = 0.0  # latencies and lengths: from zero, for scale
    if y_range is not None:
        y0, y1 = y_range
    else:
        ys = [y for _, y in pts]
        y0, y1 = min(0.0, min(ys)), max(ys)
        y1 = y1 * 1.05 if y1 > 0 else 1.0
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM

    def sx(x: float) -> float:
        return LEFT + (fx(x) - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return TOP + ph - (y - y0) / (y1 - y0) * ph

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" role="img">']
    out.append(f"<title>{_e(title)}</title><style>{SVG_STYLE}</style>")
    out.append(f'<rect width="{W}" height="{H}" fill="#fff"/>')
    out.append(f'<text x="{W / 2}" y="18" text-anchor="middle" class="t">{_e(title)}</text>')
    out.append(f'<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" class="frame"/>')
    for t in nice_ticks(y0, y1):
        y = sy(t)
        out.append(f'<line x1="{LEFT}" x2="{LEFT + pw}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>')
        out.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{_e(_fmt(t))}</text>')
    xticks = [2.0**k for k in range(math.floor(x0), math.ceil(x1) + 1)] if x_log2 else nice_ticks(x0, x1)
    for t in xticks:
        if not x0 - 1e-9 <= fx(t) <= x1 + 1e-9:
            continue
        x = sx(t)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{TOP}" y2="{TOP + ph}" class="grid"/>')
        out.append(f'<text x="{x:.1f}" y="{TOP + ph + 16}" text-anchor="middle">{_e(_fmt(t))}</text>')
    out.append(f'<text x="{LEFT + pw / 2}" y="{H - 8}" text-anchor="middle">{_e(x_label)}</text>')
    out.append(f'<text x="14" y="{TOP + ph / 2}" text-anchor="middle" transform="rotate(-90 14 {TOP + ph / 2})">{_e(y_label)}</text>')
    for i, (x, label) in enumerate(markers):
        px = sx(x)
        right = px > LEFT + pw - 30
        out.append(f'<line x1="{px:.1f}" x2="{px:.1f}" y1="{TOP}" y2="{TOP + ph}" class="mark"/>')
        out.append(
            f'<text x="{px - 3 if right else px + 3:.1f}" y="{TOP + ph - 6 - 12 * i}" class="small" '
            f'text-anchor="{"end" if right else "start"}">{_e(label)}</text>'
        )
    lx = float(LEFT)
    for label, color, ps in series:
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in ps)
        if len(ps) > 1:
            out.append(f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="1.6"/>')
        if len(ps) <= 24:
            out += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.6" fill="{color}"/>' for x, y in ps]
        out.append(f'<rect x="{lx:.1f}" y="{TOP - 15}" width="10" height="10" fill="{color}"/>')
        out.append(f'<text x="{lx + 14:.1f}" y="{TOP - 6}" class="small">{_e(label)}</text>')
        lx += 24 + 6.2 * len(label)
    out.append("</svg>")
    return "\n".join(out)


def cdf_points(values: Sequence[float], scale: float = 1000.0) -> list[Point]:
    """(value × scale, cumulative fraction), through at most CDF_POINTS quantiles."""
    if not values:
        return []
    ordered = sorted(values)
    n = len(ordered)
    if n <= CDF_POINTS:
        return [(v * scale, (i + 1) / n) for i, v in enumerate(ordered)]
    return [(percentile(ordered, 100.0 * k / (CDF_POINTS - 1)) * scale, k / (CDF_POINTS - 1)) for k in range(CDF_POINTS)]


def _samples(lv: LevelRun, metric: str) -> list[float]:
    ok = [r for r in lv.results if r is not None and r.error is None]
    if metric == "ttft":
        return [r.ttft for r in ok if r.ttft is not None]
    if metric == "tpot":
        return [t for r in ok if (t := r.tpot) is not None]
    if metric == "itl":
        return [g for r in ok for g in r.itl]
    return [r.latency for r in ok if r.latency is not None]


def charts(out: Outcome) -> list[str]:
    svgs: list[str] = []
    levels = sorted(out.levels, key=lambda lv: lv.concurrency)
    colors = {lv.concurrency: COLORS[i % len(COLORS)] for i, lv in enumerate(levels)}
    target = out.target_level
    names = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2el": "E2EL"}
    for metric, name in names.items():
        series: list[Series] = []
        for lv in levels:
            pts = cdf_points(_samples(lv, metric))
            if pts:
                star = " *" if lv is target else ""
                series.append((f"c={lv.concurrency}{star}", colors[lv.concurrency], pts))
        marks: list[tuple[float, str]] = []
        if target is not None:
            d = getattr(target.summary, metric)
            if d is not None:
                marks = [(d.p50 * 1000, "p50"), (d.p90 * 1000, "p90"), (d.p99 * 1000, "p99")]
        svgs.append(chart(f"{name} distribution", series, f"{name} (ms)", "fraction of requests" if metric != "itl" else "fraction of gaps",
                          markers=marks, y_range=(0.0, 1.0)))  # fmt: skip
    if len(levels) > 1:
        tps = [(float(lv.concurrency), lv.summary.output_tokens_per_s) for lv in levels]
        svgs.append(chart("Throughput against concurrency", [("output tokens/s", COLORS[0], tps)], "concurrency", "tokens/s", x_log2=True))
        lat: list[Series] = []
        for metric, q, color in (("ttft", "p50", COLORS[0]), ("ttft", "p99", COLORS[1]), ("tpot", "p50", COLORS[2])):
            pts = [(float(lv.concurrency), getattr(d, q) * 1000) for lv in levels if (d := getattr(lv.summary, metric)) is not None]
            lat.append((f"{metric.upper()} {q}", color, pts))
        svgs.append(chart("Latency against concurrency", lat, "concurrency", "ms", x_log2=True))
    rungs = sorted((r for r in out.ladder if r.get("status") == 200), key=lambda r: r["prompt_tokens"])
    if rungs:
        pts = [(float(r["prompt_tokens"]), r["latency_s"] * 1000) for r in rungs]
        svgs.append(chart("Context ladder: prompt + 1 token", [("latency", COLORS[0], pts)], "prompt tokens", "ms"))
    return [s for s in svgs if s]


CSS = """
body { font: 14px system-ui, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 18px; } .ok { color: #1a7f37; } .bad { color: #c62828; }
table { border-collapse: collapse; margin: 12px 0; } td, th { padding: 3px 10px; border-bottom: 1px solid #ddd; text-align: left; }
.fail { color: #c62828; font-weight: bold; } .warn { color: #b26a00; } .info { color: #777; }
.charts { display: flex; flex-wrap: wrap; gap: 12px; }
svg { border: 1px solid #eee; }
"""


def render(out: Outcome) -> str:
    cfg = out.config
    code = int(out.exit_code)
    verdict = {0: "all targets met", 1: "could not measure", 2: "target missed"}[code]
    title = f"llmfleet verify · {cfg.instance or cfg.url} · {out.model or cfg.model or '?'}"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f'<p class="{"ok" if code == 0 else "bad"}">result: {_e(verdict)} (exit {code}){_e(": " + out.error) if out.error else ""}</p>',
        f"<p>{_e(cfg.url)} · started {_e(out.started_at)} · run {_e(out.run_id)}"
        + (f" · generation {_e(cfg.generation)}" if cfg.generation else "")
        + "</p>",
        "<table><tr><th>check</th><th>measured</th><th>target</th><th>verdict</th><th>detail</th></tr>",
    ]
    for c in out.checks:
        unit = f" {c.unit}" if c.unit and c.measured is not None and not isinstance(c.measured, str) else ""
        parts.append(
            f"<tr><td>{_e(c.name)}</td><td>{_e(c.measured if c.measured is not None else '—')}{_e(unit)}</td>"
            f'<td>{_e(c.target or "—")}</td><td class="{_e(c.verdict)}">{_e(str(c.verdict).upper())}</td><td>{_e(c.detail)}</td></tr>'
        )
    parts.append("</table>")
    parts.append('<div class="charts">')
    parts += charts(out)
    parts.append("</div>")
    parts.append(
        '<p class="info">TTFT: request sent → first content chunk · TPOT: (E2EL − TTFT) ÷ (output tokens − 1) · '
        "ITL: gaps between content chunks · E2EL: sent → last content chunk (vLLM's bench definitions) · * the target level</p>"
    )
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
