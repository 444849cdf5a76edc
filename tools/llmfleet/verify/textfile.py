"""The outcome as a Prometheus textfile, for node_exporter's textfile collector.

Point ``--textfile`` at ``<collector dir>/llmfleet_verify_<instance>.prom`` (node_exporter
``--collector.textfile.directory``; it reads ``*.prom`` only). The file is written to a temporary
name in the same directory and renamed, so the collector never reads half a file; it is written
after every run, one that could not measure included (``llmfleet_verify_exit_code`` 1), so an
alert on the exit code sees a broken server too.

The instance is the label ``llmfleet_instance``: Prometheus sets ``instance`` itself (the scraped
node_exporter). Latencies are gauges with a ``quantile`` label, in seconds; a series per
concurrency level and phase (``target``: the targets are judged there; ``level``; ``sweep``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

from .httpclient import Endpoint
from .results import Outcome

PREFIX = "llmfleet_verify_"
QUANTILES = (("0.5", "p50"), ("0.9", "p90"), ("0.95", "p95"), ("0.99", "p99"))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return str(int(v)) if v.is_integer() and abs(v) < 1e15 else repr(v)


#: family (without the prefix) → its HELP text; every family is a gauge
HELP: dict[str, str] = {
    "exit_code": "Exit code of the last verify run: 0 every target met, 2 a target missed, 1 could not measure.",
    "ok": "1 when the last verify run met every target.",
    "last_run_timestamp_seconds": "When the last verify run ended (Unix time).",
    "duration_seconds": "Wall time of the last verify run.",
    "check": "One series per check of the last run, its verdict as a label (fail: a target missed).",
    "output_tokens_per_second": "Output tokens per second over the load (tokens from usage).",
    "requests_per_second": "Successful requests per second over the load.",
    "requests": "Load requests by outcome (refused: HTTP 4xx, also counted as failed).",
    "latency_seconds": "Client-side latency quantiles (vLLM's bench definitions).",
    "client_cpu_share": "Client CPU time over wall time during the load (near 1: the client limits the figures).",
    "kv_cache_tokens": "KV-cache capacity the server reports (vllm:cache_config_info).",
    "kv_cache_plan_tokens": "KV-cache capacity the capacity planner predicted.",
    "max_model_len_tokens": "max_model_len the server reports.",
    "longest_prompt_tokens": "Longest prompt the server answered (context ladder).",
    "decode_tokens_per_second_per_sequence": "1 / TPOT p50 at the lowest concurrency measured.",
    "decode_bound_share": "Per-sequence decode rate as a share of the planner's memory-bandwidth bound.",
    "sweep_knee_concurrency": "Concurrency past which output tokens/s stopped growing.",
    "sweep_knee_output_tokens_per_second": "Output tokens/s at the sweep's knee.",
    "sweep_peak_output_tokens_per_second": "Highest output tokens/s of the sweep.",
}


class _Families:
    """Samples grouped by family, each with one HELP and one TYPE line (the exposition format's rule)."""

    def __init__(self, common: Mapping[str, str]) -> None:
        self.common = dict(common)
        self.families: dict[str, list[str]] = {}

    def add(self, name: str, value: object, **labels: str) -> None:
        if not isinstance(value, int | float) or isinstance(value, bool):
            return
        text = ",".join(f'{k}="{_escape(v)}"' for k, v in {**self.common, **labels}.items())
        self.families.setdefault(name, []).append(f"{PREFIX}{name}{{{text}}} {_number(float(value))}")

    def text(self) -> str:
        lines: list[str] = []
        for name, samples in self.families.items():
            lines += [f"# HELP {PREFIX}{name} {HELP[name]}", f"# TYPE {PREFIX}{name} gauge", *samples]
        return "\n".join(lines) + "\n"


def _mapping(v: object) -> Mapping[str, Any]:
    return v if isinstance(v, Mapping) else {}


def render(out: Outcome, now: float | None = None) -> str:
    """The textfile's content."""
    cfg = out.config
    common = {"llmfleet_instance": cfg.instance or Endpoint.parse(cfg.url).authority, "model": out.model or cfg.model or ""}
    if cfg.generation:
        common["generation"] = cfg.generation
    f = _Families(common)
    code = int(out.exit_code)
    f.add("exit_code", code)
    f.add("ok", 1 if code == 0 else 0)
    f.add("last_run_timestamp_seconds", time.time() if now is None else now)
    f.add("duration_seconds", out.duration_s)
    for c in out.checks:
        f.add("check", 1, check=c.name, verdict=str(c.verdict))
    for lv in out.levels:
        s = lv.summary
        lab = {"concurrency": str(lv.concurrency), "phase": lv.phase}
        f.add("output_tokens_per_second", s.output_tokens_per_s, **lab)
        f.add("requests_per_second", s.requests_per_s, **lab)
        outcomes = {"complete": s.complete, "cut_short": s.cut_short, "failed": s.failed, "refused": s.refused, "not_sent": s.not_sent}
        for outcome, n in outcomes.items():
            f.add("requests", n, outcome=outcome, **lab)
        for metric, d in (("ttft", s.ttft), ("tpot", s.tpot), ("itl", s.itl), ("e2el", s.e2el)):
            for q, attr in QUANTILES if d is not None else ():
                f.add("latency_seconds", getattr(d, attr), metric=metric, quantile=q, **lab)
        f.add("client_cpu_share", lv.client_cpu_share, **lab)
    server = out.server
    kv = _mapping(server.get("kv_cache"))
    f.add("kv_cache_tokens", kv.get("tokens"))
    f.add("kv_cache_plan_tokens", kv.get("plan_tokens"))
    f.add("max_model_len_tokens", server.get("max_model_len"))
    ladder = _mapping(server.get("context_ladder"))
    f.add("longest_prompt_tokens", ladder.get("longest_answered_prompt_tokens"))
    decode = _mapping(server.get("decode"))
    f.add("decode_tokens_per_second_per_sequence", decode.get("tokens_per_s_per_sequence"))
    f.add("decode_bound_share", decode.get("share"))
    sweep = out.sweep or {}
    f.add("sweep_knee_concurrency", sweep.get("knee_concurrency"))
    f.add("sweep_knee_output_tokens_per_second", sweep.get("knee_output_tokens_per_s"))
    f.add("sweep_peak_output_tokens_per_second", sweep.get("peak_output_tokens_per_s"))
    return f.text()


def render_error(instance: str, reason: str, now: float | None = None) -> str:
    """The textfile of a run that could not even start (bad plan, bad arguments): exit code 1."""
    f = _Families({"llmfleet_instance": instance})
    f.add("exit_code", 1)
    f.add("ok", 0)
    f.add("last_run_timestamp_seconds", time.time() if now is None else now)
    return f"# verify could not run: {' '.join(reason.split())[:200]}\n" + f.text()
