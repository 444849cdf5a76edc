"""The last good run: compare a new run's figures with the newest passing result of the instance.

Each host keeps its verify results (the ``vllm_verify`` role writes the JSON envelope of every run
to ``<root>/verify/<generation>/<instance>.json``). The baseline is the newest envelope in that
tree (``DIR/*.json`` and ``DIR/*/*.json``) that passed (``exit_code`` 0), is of the same instance
(by name; by URL when the run has no instance name) and is not the current run. Files that are not
verify envelopes are skipped and counted, never fatal: a history is a help, not an input.

Only performance figures of the target level are compared, and only when the workload is the same
(concurrency, prompt and output tokens, model): capacities are judged against the plan instead,
which may change on purpose from one generation to the next.

Output tokens/s and TPOT p50 fail beyond the tolerance: both average over every token of the run
and move little from one run to the next (±10 % on the shared 2-core lab). TTFT p50 and E2EL p50
only warn: one run's TTFT median moves with how arrivals line up with decode steps (±30 % between
back-to-back runs on the lab), and TTFT has its absolute target (``max_ttft_p95_s``) already.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checks import Check, Verdict

SCHEMA_PREFIX = "llmfleet.verify/"
MAX_RESULT_BYTES = 16 << 20
MAX_FILES = 10_000
#: envelope ``load`` keys whose values must be equal for two runs to be comparable
WORKLOAD = ("concurrency", "prompt_tokens", "output_tokens")
#: (check name, path in the envelope's ``load``, True when higher is better, True when a regression fails)
FIGURES: tuple[tuple[str, tuple[str, ...], bool, bool], ...] = (
    ("regression_output_tokens_per_s", ("output_tokens_per_s",), True, True),
    ("regression_tpot_p50_s", ("tpot_s", "p50"), False, True),
    ("regression_ttft_p50_s", ("ttft_s", "p50"), False, False),
    ("regression_e2el_p50_s", ("e2el_s", "p50"), False, False),
)


@dataclass(frozen=True, slots=True)
class Baseline:
    path: str
    envelope: Mapping[str, Any]

    @property
    def started_at(self) -> str:
        return str(self.envelope.get("started_at") or "?")

    @property
    def generation(self) -> str | None:
        inst = self.envelope.get("instance")
        gen = inst.get("generation") if isinstance(inst, Mapping) else None
        return gen if isinstance(gen, str) else None


@dataclass(frozen=True, slots=True)
class Search:
    baseline: Baseline | None
    scanned: int  # verify envelopes of this instance seen
    skipped: int  # files that could not be read as envelopes


def _read(path: Path) -> dict[str, Any] | None:
    try:
        if path.stat().st_size > MAX_RESULT_BYTES:
            return None
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(obj, dict) or not str(obj.get("schema", "")).startswith(SCHEMA_PREFIX):
        return None
    return obj


def _same_instance(env: Mapping[str, Any], instance: str | None, url: str) -> bool:
    inst = env.get("instance")
    if not isinstance(inst, Mapping):
        return False
    if instance is not None:
        return inst.get("name") == instance
    return inst.get("name") is None and inst.get("url") == url


def find_baseline(directory: str, instance: str | None, url: str, current_run_id: str | None = None) -> Search:
    """The newest passing result of this instance under ``directory`` (missing directory: none)."""
    root = Path(directory)
    if not root.is_dir():
        return Search(None, 0, 0)
    files = sorted([*root.glob("*.json"), *root.glob("*/*.json")])[:MAX_FILES]
    best: tuple[str, float, Baseline] | None = None
    scanned = skipped = 0
    for path in files:
        env = _read(path)
        if env is None:
            skipped += 1
            continue
        if not _same_instance(env, instance, url):
            continue
        scanned += 1
        if env.get("exit_code") != 0 or env.get("ok") is not True or not isinstance(env.get("load"), Mapping):
            continue
        if current_run_id is not None and env.get("run_id") == current_run_id:
            continue
        try:
            mtime = path.stat().st_mtime
        except OSError:
            continue
        key = (str(env.get("started_at") or ""), mtime)
        if best is None or key > best[:2]:
            best = (*key, Baseline(str(path), env))
    return Search(best[2] if best else None, scanned, skipped)


def _figure(load: Mapping[str, Any], path: tuple[str, ...]) -> float | None:
    v: Any = load
    for key in path:
        v = v.get(key) if isinstance(v, Mapping) else None
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) and v >= 0 else None


def not_comparable(current: Mapping[str, Any], model: str | None, base: Baseline) -> str | None:
    """Why the two runs measure different things, or None when they are comparable."""
    before = base.envelope.get("load")
    assert isinstance(before, Mapping)
    for key in WORKLOAD:
        if current.get(key) != before.get(key):
            return f"{key} {before.get(key)} then, {current.get(key)} now"
    inst = base.envelope.get("instance")
    then = inst.get("model") if isinstance(inst, Mapping) else None
    if model is not None and then is not None and then != model:
        return f"model {then} then, {model} now"
    return None


def compare(current: Mapping[str, Any], base: Baseline, tolerance: float) -> list[Check]:
    """One check per figure: worse than the baseline by more than ``tolerance`` (a fraction) fails (or warns)."""
    before = base.envelope.get("load")
    assert isinstance(before, Mapping)
    gen = f", generation {base.generation}" if base.generation else ""
    where = f"last passing run {base.started_at}{gen}"
    out: list[Check] = []
    for name, path, higher_is_better, fails in FIGURES:
        now, then = _figure(current, path), _figure(before, path)
        unit = "tokens/s" if higher_is_better else "s"
        if now is None or not then:  # a zero baseline (all tokens in one read) has no ratio
            out.append(Check(name, now, None, Verdict.INFO, unit, f"not in both runs ({where})"))
            continue
        change = now / then - 1
        if higher_is_better:
            limit = then * (1 - tolerance)
            ok = now >= limit
            target = f">= {limit:.4g} (-{tolerance:.0%})"
        else:
            limit = then * (1 + tolerance)
            ok = now <= limit
            target = f"<= {limit:.4g} (+{tolerance:.0%})"
        detail = f"{change:+.1%} vs {then:.4g} of the {where}"
        verdict = Verdict.PASS if ok else Verdict.FAIL if fails else Verdict.WARN
        out.append(Check(name, round(now, 6), target, verdict, unit, detail))
    return out
