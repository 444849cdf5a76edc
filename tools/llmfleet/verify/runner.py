"""One verify run against a live vLLM OpenAI-compatible server.

Steps, in order; the first that cannot measure ends the run with a :class:`VerifyError`:

1. wait for ``/health`` (bounded by ``ready_timeout``);
2. ``/v1/models``: the served model id, its revision (``root``, the plan's content-addressed
   store path) and its ``max_model_len`` (≥ ``min_context_tokens``, = the plan's);
3. ``/metrics``: KV-cache capacity from ``vllm:cache_config_info``, against the target and the
   capacity planner's prediction (exactly on a CPU build, as a ratio on GPUs);
4. full-context probe: a prompt of exactly ``min_context_tokens − 4`` tokens (counted with
   ``/tokenize``) and ``max_tokens = 4``, non-streaming, must be answered in full (vLLM answers a
   prompt only while prompt + one output token fit ``max_model_len``);
5. context ladder: prompts of ⅛, ¼, ½ of ``max_model_len`` and ``max_model_len − 1`` tokens with
   ``max_tokens = 1`` must be answered (else the longest answered length is searched), prompts of
   ``max_model_len`` and ``max_model_len + 1`` tokens must be refused cleanly (HTTP 4xx). A 4xx
   below the limit or an answer past it misses a target (exit 2); no answer or a 5xx on any rung is
   a broken server and ends the run (exit 1), as a 5xx does everywhere else;
6. the fixed streaming load at the target concurrency (``load``), then at the extra levels and
   the sweep, each between two ``/metrics`` scrapes whose counter deltas must equal the client's
   own counts; then the per-sequence decode rate against the planner's bandwidth bound;
7. the figures against the last passing run of the instance (:mod:`llmfleet.verify.history`).

Figures are defined in :mod:`llmfleet.verify.metrics`.
Requests and their answers are :mod:`llmfleet.verify.client`'s; what a run found, :mod:`llmfleet.verify.results`'.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import secrets
import time
from collections.abc import Coroutine, Iterable, Mapping, Sequence
from typing import Any

from . import history, prometheus
from .checks import Check, Verdict, agrees, at_least, at_most
from .client import COMPLETIONS, complete, error_message, get, json_body, one_line, scrape, stream_completion, token_count
from .config import VerifyConfig
from .errors import VerifyError
from .httpclient import Connection, Endpoint, HttpError, Timeouts, seconds
from .keys import auth_headers
from .metrics import RequestResult, summarize
from .prompts import PromptBuilder
from .results import LevelRun, Outcome, Progress

#: server histograms compared with the client's distributions (first name found wins)
SERVER_HISTOGRAMS: dict[str, tuple[str, ...]] = {
    "ttft_s": ("vllm:time_to_first_token_seconds",),
    "itl_s": ("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds"),
    "tpot_s": ("vllm:request_time_per_output_token_seconds",),
    "e2el_s": ("vllm:e2e_request_latency_seconds",),
}
GENERATION_TOKENS = "vllm:generation_tokens_total"
PROMPT_TOKENS = "vllm:prompt_tokens_total"
#: the server publishes its counters a moment after the last response: wait this long for them
COUNTER_SETTLE_S = 2.0
#: the client is close to being what limits the figures above this share of one core
CLIENT_CPU_WARN = 0.8
#: a GPU's KV capacity this far from the planner's prediction is worth a look
KV_RATIO_WARN = (0.8, 1.25)
#: the ladder's search for the longest answered prompt stops after this many probes
LADDER_MAX_SEARCH = 12
#: seeds of ladder and load prompts start here (distinct first tokens: no prefix-cache hits)
LADDER_SEED = 1_000_000
#: a run's load prompts take seeds from a random start in this range (``--prompt-seed`` fixes it): a
#: second run against the same server must not find the first run's prompts in its prefix cache
LOAD_SEEDS = (100_000_000, 1_000_000_000)
#: prompt tokens served from the prefix cache over the load, as a share of all: above this TTFT is flattered
PREFIX_HIT_WARN = 0.01
PREFIX_QUERIES = "vllm:prefix_cache_queries_total"
#: a health probe's whole-request deadline comes this long after its phase limits
PROBE_TOTAL_MARGIN_S = 0.25
PREFIX_HITS = "vllm:prefix_cache_hits_total"


async def _all(coros: Iterable[Coroutine[Any, Any, None]]) -> None:
    """Run concurrently; the first failure cancels the rest and is raised as itself (not a group)."""
    try:
        async with asyncio.TaskGroup() as tg:
            for c in coros:
                tg.create_task(c)
    except BaseExceptionGroup as group:
        first: BaseException = group
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from None


async def run_load(
    conns: Sequence[Connection],
    model: str,
    prompts: Sequence[str],
    output_tokens: int,
    progress: Progress | None = None,
    label: str = "load",
) -> tuple[list[RequestResult | None], float]:
    """The fixed streaming load: one worker per connection, ``len(prompts)`` requests in all.

    Returns one result per prompt (None: never sent, because a failure stopped the load: once a
    request fails nothing more is sent, and the requests in flight finish) and the wall time.
    """
    results: list[RequestResult | None] = [None] * len(prompts)
    next_index = 0
    stop = False

    async def worker(conn: Connection) -> None:
        nonlocal next_index, stop
        while not stop and next_index < len(prompts):
            i = next_index
            next_index += 1
            r = await stream_completion(conn, model, prompts[i], output_tokens)
            results[i] = r
            if r.error is not None:
                stop = True
            if progress is not None:
                progress.advance(r)

    if progress is not None:
        progress.start(len(prompts), label)
    try:
        t0 = time.perf_counter()
        await _all(worker(conn) for conn in conns)
        duration = time.perf_counter() - t0
    finally:
        if progress is not None:
            progress.stop()
    return results, duration


class _Run:
    def __init__(self, config: VerifyConfig, progress: Progress | None) -> None:
        self.config = config
        self.progress = progress
        self.endpoint = Endpoint.parse(config.url)
        self.headers = auth_headers(config)
        self.outcome = Outcome(config, dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))
        self.server = self.outcome.server
        self.server["url"] = str(self.endpoint)
        self.conn = self._connection()
        self.builder = PromptBuilder(self.count_tokens)
        # load prompts: seed 0 is the context probe's and 1_000_000 + n the ladder's, whose first blocks must not be
        # cached for them; a random start per run (unless fixed) keeps an earlier run's prompts out of the cache too
        seed = config.prompt_seed
        self.next_seed = seed if seed is not None else secrets.randbelow(LOAD_SEEDS[1] - LOAD_SEEDS[0]) + LOAD_SEEDS[0]
        self.before: prometheus.Exposition | str = "not read yet"  # the last scrape before the next level

    def _connection(self, timeouts: Timeouts | None = None) -> Connection:
        return Connection(self.endpoint, timeouts or self.config.timeouts, self.headers)

    def check(self, c: Check) -> None:
        self.outcome.checks.append(c)

    # -- 1. ready -------------------------------------------------------------------------------

    async def wait_ready(self) -> None:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        limit = self.config.ready_timeout
        deadline = t0 + limit
        base = self.config.timeouts
        delay = 0.2
        while True:
            # each probe's limits are capped by the time left (at least 0.5 s: a zero wait still probes once),
            # the whole probe too (a moment later, so a silent server is named by its phase): a body that
            # trickles inside the idle timeout must not outlive the wait
            remaining = max(deadline - loop.time(), 0.5)
            probe = Timeouts(
                min(base.connect, remaining), min(base.first_byte, remaining), min(base.idle, remaining), remaining + PROBE_TOTAL_MARGIN_S
            )
            conn = self._connection(probe)
            try:
                resp = await conn.request("GET", "/health")
                if resp.status == 200:
                    self.server["health_wait_s"] = round(loop.time() - t0, 3)
                    return
                last = f"/health answered HTTP {resp.status}: {error_message(resp)}"
            except HttpError as exc:
                last = str(exc)
            finally:
                conn.close()
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise VerifyError(f"server not ready after {seconds(limit)} s: {last}")
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 2, 2.0)

    # -- 2. models ------------------------------------------------------------------------------

    async def check_models(self) -> int | None:
        try:
            resp = await self.conn.request("GET", "/version")
            if resp.status == 200:
                version = json.loads(resp.body).get("version")
                if isinstance(version, str):
                    self.server["version"] = version
        except (HttpError, ValueError, AttributeError):
            pass
        resp = await get(self.conn, "/v1/models")
        if resp.status != 200:
            raise VerifyError(f"GET /v1/models answered HTTP {resp.status}: {error_message(resp)}")
        obj = json_body(resp, "GET /v1/models")
        data = obj.get("data") if isinstance(obj, dict) else None
        if not isinstance(data, list) or not all(isinstance(m, dict) and isinstance(m.get("id"), str) for m in data):
            raise VerifyError("GET /v1/models answered no list of models with ids")
        ids = [m["id"] for m in data]
        self.server["models"] = ids
        want = self.config.model
        if want is None:
            if len(ids) != 1:
                raise VerifyError(f"server serves {len(ids)} models ({', '.join(ids) or 'none'}): pass --model")
            want = ids[0]
        if want not in ids:
            self.check(Check("model", ", ".join(ids) or "none", want, Verdict.FAIL))
            raise VerifyError(f"wrong model: server serves {', '.join(ids) or 'nothing'}, expected {want}")
        self.outcome.model = want
        self.check(Check("model", want, want, Verdict.PASS))
        entry = data[ids.index(want)]
        self.check_revision(entry.get("root"))
        mml = entry.get("max_model_len")
        mml = mml if isinstance(mml, int) and not isinstance(mml, bool) else None
        self.server["max_model_len"] = mml
        min_ctx = self.config.targets.min_context_tokens
        plan_mml = self.config.plan_max_model_len
        if mml is None:
            if min_ctx is not None:
                raise VerifyError(f"GET /v1/models gives no max_model_len for {want}: cannot check min_context_tokens")
            if plan_mml is not None:
                self.check(Check("max_model_len_plan", None, f"= {plan_mml}", Verdict.WARN, "tokens", "not published by the server"))
            return None
        self.check(at_least("max_model_len", mml, min_ctx, "tokens"))
        if plan_mml is not None:
            same = plan_mml == mml
            why = "as planned" if same else "the server runs another max_model_len than the plan (an older generation?)"
            self.check(Check("max_model_len_plan", mml, f"= {plan_mml}", Verdict.PASS if same else Verdict.FAIL, "tokens", why))
        return mml

    def check_revision(self, root: object) -> None:
        """The served weights are the plan's: vLLM's ``root`` is the content-addressed store path.

        A mismatch ends the run (exit 1), like a wrong model id: figures of other weights say
        nothing about the plan, and comparing them with its targets or the last run would mislead.
        """
        plan = self.config.plan
        served = root.rstrip("/") if isinstance(root, str) and root else None
        self.server["model_root"] = served
        want = plan.model_root.rstrip("/") if plan.model_root else None
        rev = f"revision {plan.revision[:12]}, " if plan.revision else ""
        if want is None:
            if served is not None:
                self.check(Check("model_revision", served, None, Verdict.INFO, "", "the served model's path (no plan to compare)"))
            return
        if served is None:
            self.check(Check("model_revision", None, f"= {want}", Verdict.WARN, "", "GET /v1/models gives no 'root': cannot compare"))
            return
        if served == want:
            self.check(Check("model_revision", served.rsplit("/", 1)[-1], "plan's store path", Verdict.PASS, "", f"{rev}{served}"))
            return
        self.check(Check("model_revision", served, f"= {want}", Verdict.FAIL, "", "another model directory than the plan's"))
        raise VerifyError(f"wrong model revision: server serves {served}, the plan's ({rev}store path) is {want}")

    async def check_key_required(self) -> None:
        """With a key to send, the instance is one that requires it: a request without it must be refused
        (an exposed instance that came back without its key answers everyone)."""
        if "Authorization" not in self.headers:
            return
        conn = Connection(self.endpoint, self.config.timeouts)  # no Authorization header
        try:
            resp = await conn.request("GET", "/v1/models")
        except HttpError as exc:
            raise VerifyError(f"GET /v1/models without the API key: {exc}") from None
        finally:
            conn.close()
        if resp.status in (401, 403):
            self.check(Check("api_key_required", resp.status, "401 or 403", Verdict.PASS, "", "a request without the key is refused"))
        else:
            why = f"answered GET /v1/models without the API key (HTTP {resp.status}): the instance does not require its key"
            self.check(Check("api_key_required", resp.status, "401 or 403", Verdict.FAIL, "", why))

    # -- 3. metrics -----------------------------------------------------------------------------

    def _label_match(self) -> dict[str, str]:
        return {"model_name": self.outcome.model} if self.outcome.model else {}

    def check_kv_cache(self, expo: prometheus.Exposition | str) -> None:
        target = self.config.targets.min_kv_cache_tokens
        plan = self.config.plan
        if isinstance(expo, str):
            self.server["metrics_error"] = expo
            if target is not None:
                raise VerifyError(f"cannot read the KV-cache capacity: {expo}")
            self.check(Check("metrics", "unavailable", None, Verdict.WARN, "", expo))
            return
        cap = prometheus.kv_cache_capacity(expo, self._label_match())
        if cap is None:
            self.server["kv_cache"] = None
            if target is not None:
                raise VerifyError("cannot read the KV-cache capacity: no usable vllm:cache_config_info in /metrics")
            if plan.kv_tokens is not None:
                why = "no vllm:cache_config_info to compare"
                self.check(Check("kv_cache_plan", None, f"= {plan.kv_tokens}", Verdict.WARN, "tokens", why))
            return
        self.server["kv_cache"] = {
            "tokens": cap.tokens,
            "blocks": cap.blocks,
            "block_size": cap.block_size,
            "source": cap.source,
            "series": cap.series,
        }
        how = f"{cap.blocks} blocks × {cap.block_size}" if cap.source != "kv_cache_size_tokens" else "kv_cache_size_tokens"
        self.check(at_least("kv_cache_tokens", cap.tokens, target, "tokens", how))
        self._kv_against_plan(cap)

    def _kv_against_plan(self, cap: prometheus.KvCacheCapacity) -> None:
        plan = self.config.plan
        if plan.kv_tokens is None:
            return
        server = f"server {cap.tokens} tokens" + (f" in {cap.blocks} blocks of {cap.block_size}" if cap.blocks is not None else "")
        planned = f"plan {plan.kv_tokens} tokens"
        if plan.kv_blocks is not None:
            planned += f" in {plan.kv_blocks} blocks of {plan.kv_block_size}"
        ratio = cap.tokens / plan.kv_tokens if plan.kv_tokens else 0.0
        self.server["kv_cache"]["plan_tokens"] = plan.kv_tokens
        self.server["kv_cache"]["plan_blocks"] = plan.kv_blocks
        self.server["kv_cache"]["ratio_to_plan"] = round(ratio, 4)
        if plan.kv_exact:
            same = cap.tokens == plan.kv_tokens and (plan.kv_blocks is None or cap.blocks is None or cap.blocks == plan.kv_blocks)
            verdict = Verdict.PASS if same else Verdict.FAIL
            self.check(Check("kv_cache_plan", cap.tokens, f"= {plan.kv_tokens}", verdict, "tokens", f"{server}; {planned} (CPU: exact)"))
            return
        lo, hi = KV_RATIO_WARN
        verdict = Verdict.INFO if lo <= ratio <= hi else Verdict.WARN
        why = "estimate" if plan.kv_estimate else "profiled at start"
        self.check(Check("kv_cache_plan", round(ratio, 3), "ratio to the plan", verdict, "", f"{server}; {planned} ({why})"))

    # -- 4. context probe -----------------------------------------------------------------------

    async def count_tokens(self, text: str, conn: Connection | None = None) -> int:
        assert self.outcome.model is not None
        return await token_count(conn or self.conn, self.outcome.model, text)

    async def context_probe(self, max_model_len: int | None) -> None:
        ctx = self.config.targets.min_context_tokens
        if ctx is None:
            return
        if max_model_len is not None and max_model_len < ctx:
            self.server["context_probe"] = {"skipped": f"max_model_len {max_model_len} < {ctx}"}
            self.check(Check("context_tokens", None, f">= {ctx}", Verdict.FAIL, "tokens", "not probed: max_model_len too small"))
            return
        out = self.config.context_probe_output_tokens
        n = ctx - out
        prompt = await self.builder.build(n)
        a = await complete(self.conn, self.outcome.model, prompt, out)
        probe: dict[str, Any] = {"prompt_tokens": n, "max_tokens": out, "status": a.status, "latency_s": round(a.latency_s, 4)}
        self.server["context_probe"] = probe
        if a.status is None:
            raise VerifyError(f"context probe: {a.error}")
        if a.status >= 500:
            raise VerifyError(f"context probe: POST {COMPLETIONS} answered HTTP {a.status}: {a.error}")
        if a.status != 200:
            probe["error"] = a.error
            why = f"{n}+{out} tokens refused: HTTP {a.status}: {a.error}"
            self.check(Check("context_tokens", None, f">= {ctx}", Verdict.FAIL, "tokens", why))
            return
        assert a.prompt_tokens is not None and a.output_tokens is not None
        pt, ct = a.prompt_tokens, a.output_tokens
        probe.update(answered_prompt_tokens=pt, answered_output_tokens=ct, finish_reason=a.finish_reason)
        detail = f"prompt {pt} + output {ct} tokens, finish_reason {a.finish_reason}"
        measured = pt + ct
        if ct < out:
            self.check(Check("context_tokens", measured, f">= {ctx}", Verdict.FAIL, "tokens", "cut short: " + detail))
        else:
            self.check(at_least("context_tokens", measured, ctx, "tokens", detail))

    # -- 5. context ladder ----------------------------------------------------------------------

    async def _rung(self, n: int, kind: str, check: str) -> dict[str, Any]:
        """One prompt of ``n`` tokens and ``max_tokens = 1``. A server failure (no answer, 5xx) adds a
        failed ``check`` and ends the run: the server broke on a prompt it should answer or refuse."""
        prompt = await self.builder.build(n, LADDER_SEED + n)
        a = await complete(self.conn, self.outcome.model, prompt, 1)
        rung: dict[str, Any] = {"prompt_tokens": n, "kind": kind, "status": a.status, "latency_s": round(a.latency_s, 4)}
        if a.status == 200:
            rung["answered_prompt_tokens"] = a.prompt_tokens
            rung["output_tokens"] = a.output_tokens
            if a.latency_s > 0:
                rung["prompt_tokens_per_s"] = round(n / a.latency_s, 1)
        else:
            rung["error"] = a.error
        self.outcome.ladder.append(rung)
        if self.progress is not None:
            self.progress.advance(RequestResult(1, output_tokens=1 if a.status == 200 else 0))
        if a.status is None or a.status >= 500:
            why = f"{n} prompt tokens: " + (f"HTTP {a.status}: {a.error}" if a.status else str(a.error))
            self.check(Check(check, None, "an answer or HTTP 4xx", Verdict.FAIL, "tokens", why))
            raise VerifyError(f"context ladder: {why}")
        return rung

    @staticmethod
    def _accepted(rung: Mapping[str, Any]) -> bool:
        return bool(rung["status"] == 200 and rung.get("output_tokens"))

    async def context_ladder(self, mml: int | None) -> None:
        """The longest prompt the server answers, and clean refusals past its limit."""
        if not self.config.ladder:
            return
        if mml is None:
            self.check(Check("context_ladder", None, None, Verdict.WARN, "tokens", "not run: the server publishes no max_model_len"))
            return
        edge = mml - 1  # vLLM answers a prompt while prompt + 1 output token fit max_model_len
        ups = sorted({n for n in (mml // 8, mml // 4, mml // 2, edge) if n >= 1})
        if self.progress is not None:
            self.progress.start(len(ups) + 2, "ladder")
        try:
            await self._ladder(mml, edge, ups)
            await self._overlong(mml)
        finally:
            if self.progress is not None:
                self.progress.stop()

    async def _ladder(self, mml: int, edge: int, ups: list[int]) -> None:
        best = 0  # longest answered
        refused_at: int | None = None
        for n in ups:
            if self._accepted(await self._rung(n, "ladder", "context_max_prompt")):
                best = n
            else:
                refused_at = n
                break
        bracket = ""
        if refused_at is not None:  # refused below the limit: search for the longest answered
            lo, hi = best, refused_at  # answered lo (0: none yet), refused hi
            for _ in range(LADDER_MAX_SEARCH):
                if hi - lo <= 1:
                    break
                mid = (lo + hi) // 2
                if self._accepted(await self._rung(mid, "search", "context_max_prompt")):
                    lo = mid
                else:
                    hi = mid
            best = lo
            bracket = "" if hi - lo <= 1 else f" (search stopped: answered {lo}, refused {hi})"
        self.server["context_ladder"] = {"max_model_len": mml, "longest_answered_prompt_tokens": best}
        detail = f"longest prompt answered with 1 output token (max_model_len {mml}){bracket}"
        if best < edge:
            first = next((r for r in self.outcome.ladder if not self._accepted(r)), None)
            if first is not None:
                detail += f"; {first['prompt_tokens']} refused: HTTP {first['status']}: {first.get('error')}"
        self.check(at_least("context_max_prompt", best, edge, "tokens", detail))

    async def _overlong(self, mml: int) -> None:
        """Prompts of max_model_len and max_model_len + 1 tokens leave no room: a clean 4xx is the answer."""
        answered: list[str] = []
        statuses: list[str] = []
        for n in (mml, mml + 1):
            rung = await self._rung(n, "over", "context_overlong_refused")
            statuses.append(f"{n}: HTTP {rung['status']}")
            if rung["status"] == 200:
                answered.append(f"{n} tokens answered ({rung.get('answered_prompt_tokens')} prompt tokens): the limit is not enforced")
        if answered:
            self.check(Check("context_overlong_refused", ", ".join(statuses), "HTTP 4xx", Verdict.FAIL, "", "; ".join(answered)))
            return
        last = self.outcome.ladder[-1]
        self.check(Check("context_overlong_refused", ", ".join(statuses), "HTTP 4xx", Verdict.PASS, "", str(last.get("error") or "")))

    # -- 6. load --------------------------------------------------------------------------------

    async def load(self, max_model_len: int | None) -> None:
        spec = self.config.load
        assert self.outcome.model is not None
        if max_model_len is not None and spec.prompt_tokens + spec.output_tokens > max_model_len:
            raise VerifyError(
                f"load does not fit: prompt_tokens {spec.prompt_tokens} + output_tokens {spec.output_tokens}"
                f" > max_model_len {max_model_len} of the server"
            )
        self.before = await scrape(self.conn)
        target = await self.level(spec.concurrency, spec.requests, "target")
        self._load_checks(target)
        measured = {target.concurrency: target}
        for c in self.config.levels[1:]:
            measured[c] = await self.level(c, max(spec.requests, c), "level")
        if self.config.sweep is not None:
            await self.run_sweep(measured)
        self._cross_checks()
        self._prefix_cache()
        self._physics()
        self._client_cpu()

    async def level(self, concurrency: int, requests: int, phase: str) -> LevelRun:
        """One level of the streaming load; a failed request ends the run (after recording the level)."""
        spec = self.config.load
        model = self.outcome.model
        assert model is not None
        workers = min(concurrency, requests)
        conns = [self._connection() for _ in range(workers)]
        first_seed = self.next_seed
        try:
            prompts = await self._build_prompts(conns, spec.prompt_tokens, requests)
            before = self.before
            cpu0 = time.thread_time()  # the event loop's thread: the client alone
            results, duration = await run_load(conns, model, prompts, spec.output_tokens, self.progress, f"{phase} c={concurrency}")
            cpu = time.thread_time() - cpu0
            failed = any(r is not None and r.error is not None for r in results)
            summary = summarize(results, duration)
            # after a failure the server may be wedged: do not wait on it again for a cross-check
            after = "not read: the load failed" if failed else await self._settled_scrape(before, summary.output_tokens)
        finally:
            for c in conns:
                c.close()
        self.before = after
        run = LevelRun(concurrency, phase, summary, results, cpu, first_seed)
        run.server = self._deltas(before, after)
        self.outcome.levels.append(run)
        if summary.failed:
            first = next(r.error for r in results if r is not None and r.error is not None)
            unsent = f", {summary.not_sent} not sent" if summary.not_sent else ""
            where = "" if phase == "target" else f" at concurrency {concurrency} ({phase})"
            if phase == "target":
                self._load_checks(run)
            raise VerifyError(f"{summary.failed} of {summary.planned} load requests failed{where}{unsent}; first: {first}")
        return run

    async def _settled_scrape(self, before: prometheus.Exposition | str, client_tokens: int) -> prometheus.Exposition | str:
        """Scrape after a level; vLLM may publish the last tokens a moment later, so wait for them (bounded)."""
        deadline = time.monotonic() + COUNTER_SETTLE_S
        while True:
            after = await scrape(self.conn)
            if isinstance(after, str) or isinstance(before, str):
                return after
            a, b = after.total(GENERATION_TOKENS, self._label_match()), before.total(GENERATION_TOKENS, self._label_match())
            if a is None or b is None or a - b >= client_tokens or time.monotonic() >= deadline:
                return after
            await asyncio.sleep(0.1)

    async def _build_prompts(self, conns: list[Connection], n: int, count: int) -> list[str]:
        builder = self.builder
        base = self.next_seed
        self.next_seed += count
        prompts: list[str] = [""] * count
        # the first one alone: it finds the word count the others start from
        prompts[0] = await builder.build(n, base, lambda text: self.count_tokens(text, conns[0]))
        next_index = 1

        async def work(conn: Connection) -> None:
            nonlocal next_index
            while next_index < count:
                i = next_index
                next_index += 1
                prompts[i] = await builder.build(n, base + i, lambda text: self.count_tokens(text, conn))

        await _all(work(conn) for conn in conns)
        return prompts

    def _load_checks(self, run: LevelRun) -> None:
        s, results = run.summary, run.results
        t = self.config.targets
        short = [r for r in results if r is not None and r.cut_short]
        detail = f"{s.cut_short} cut short, {s.failed} failed ({s.refused} refused), {s.not_sent} not sent"
        if short:
            r = short[0]
            detail += f"; first cut short: {r.output_tokens} of {r.requested_output_tokens} tokens, finish_reason {r.finish_reason}"
        verdict = Verdict.PASS if s.complete == s.planned else Verdict.FAIL
        self.check(Check("load_requests", f"{s.complete}/{s.planned}", "all complete", verdict, "requests", detail))
        if s.failed:
            return  # no figure from a run that could not measure
        self.check(at_least("output_tokens_per_s", round(s.output_tokens_per_s, 3), t.min_output_tokens_per_s, "tokens/s"))
        if s.ttft is not None:
            self.check(at_most("ttft_p95_s", round(s.ttft.p95, 4), t.max_ttft_p95_s, "s"))
        elif t.max_ttft_p95_s is not None:
            raise VerifyError("no TTFT measured")
        self.check(Check("requests_per_s", round(s.requests_per_s, 3), None, Verdict.INFO, "requests/s"))

    async def run_sweep(self, measured: dict[int, LevelRun]) -> None:
        """Concurrency 1, 2, 4, … until output tokens/s grows less than ``min_gain`` over the knee so far.

        The knee is the last level that still added ``min_gain``: past it, more streams buy latency, not throughput.
        """
        sweep = self.config.sweep
        assert sweep is not None
        spec = self.config.load
        best: LevelRun | None = None
        levels: list[int] = []
        stopped = f"reached the largest level ({sweep.max_concurrency})"
        c = 1
        while c <= sweep.max_concurrency:
            run = measured.get(c)
            if run is None:
                run = await self.level(c, max(spec.requests, c * sweep.requests_per_stream), "sweep")
                measured[c] = run
            levels.append(c)
            tps = run.summary.output_tokens_per_s
            if best is not None and tps < best.summary.output_tokens_per_s * (1 + sweep.min_gain):
                gain = tps / best.summary.output_tokens_per_s - 1 if best.summary.output_tokens_per_s else 0.0
                stopped = f"output tokens/s {gain:+.1%} from concurrency {best.concurrency} to {c} (< {sweep.min_gain:.0%})"
                break
            best = run
            c *= 2
        assert best is not None
        peak = max(measured[c].summary.output_tokens_per_s for c in levels)
        self.outcome.sweep = {
            "levels": levels,
            "knee_concurrency": best.concurrency,  # the last level that still added min_gain
            "knee_output_tokens_per_s": best.summary.output_tokens_per_s,
            "peak_output_tokens_per_s": peak,
            "stopped": stopped,
            "min_gain": sweep.min_gain,
        }
        detail = f"{best.summary.output_tokens_per_s:,.1f} output tokens/s there, peak {peak:,.1f}; stopped: {stopped}"
        self.check(Check("sweep_knee_concurrency", best.concurrency, None, Verdict.INFO, "streams", detail))

    def _deltas(self, before: prometheus.Exposition | str, after: prometheus.Exposition | str) -> dict[str, Any]:
        info: dict[str, Any] = {}
        if isinstance(before, str) or isinstance(after, str):
            info["error"] = before if isinstance(before, str) else after
            return info
        match = self._label_match()

        def delta(name: str) -> float | None:
            a, b = after.total(name, match), before.total(name, match)
            return None if a is None or b is None else a - b

        info["generation_tokens_delta"] = delta(GENERATION_TOKENS)
        info["prompt_tokens_delta"] = delta(PROMPT_TOKENS)
        info["request_success_delta"] = delta("vllm:request_success_total")
        info["preemptions_delta"] = delta("vllm:num_preemptions_total")
        info["prefix_cache_queries_delta"] = delta(PREFIX_QUERIES)
        info["prefix_cache_hits_delta"] = delta(PREFIX_HITS)
        hist: dict[str, Any] = {}
        for key, names in SERVER_HISTOGRAMS.items():
            for name in names:
                h1, h0 = after.histogram(name, match), before.histogram(name, match)
                if h1 is not None and h0 is not None:
                    d = h1 - h0
                    hist[key] = {
                        "metric": name,
                        "count": d.count,
                        "mean": d.mean,
                        "p50_estimate": d.quantile(0.5),
                        "p90_estimate": d.quantile(0.9),
                        "p95_estimate": d.quantile(0.95),
                        "p99_estimate": d.quantile(0.99),
                    }
                    break
        info["histograms"] = hist
        return info

    def _cross_checks(self) -> None:
        """The server's token counters over the load phase against the client's own counts (from usage)."""
        levels = self.outcome.levels
        self.server["load_metrics"] = levels[0].server if levels else {}
        for name, key, client_key, metric in (
            ("server_generation_tokens", "generation_tokens_delta", "output_tokens", GENERATION_TOKENS),
            ("server_prompt_tokens", "prompt_tokens_delta", "prompt_tokens", PROMPT_TOKENS),
        ):
            deltas = [lv.server.get(key) for lv in levels]
            client = sum(getattr(lv.summary, client_key) for lv in levels)
            server = None if any(d is None for d in deltas) else sum(d for d in deltas if d is not None)
            n = len(levels)
            detail = f"{metric} delta vs client usage" + (f", {n} levels" if n > 1 else "")
            self.check(agrees(name, server, client, detail, shared=self.config.shared_server))

    def _prefix_cache(self) -> None:
        """Prompt tokens the server took from its prefix cache over the load: none when the prompts were new to it.

        Hits mean the TTFT figures are flattered (prefill skipped): the same prompts as an earlier run
        (``--prompt-seed``), or another client's traffic."""
        levels = self.outcome.levels
        queries = [lv.server.get("prefix_cache_queries_delta") for lv in levels]
        hits = [lv.server.get("prefix_cache_hits_delta") for lv in levels]
        if not levels or any(x is None for x in (*queries, *hits)):
            return  # no prefix caching metrics (prefix caching off, or an older vLLM)
        q, h = sum(x or 0.0 for x in queries), sum(x or 0.0 for x in hits)
        share = h / q if q > 0 else 0.0
        detail = f"{h:.0f} of {q:.0f} prompt tokens served from the prefix cache during the load"
        verdict = Verdict.INFO
        if share > PREFIX_HIT_WARN:
            verdict = Verdict.WARN
            why = "another client's traffic" if self.config.shared_server else "prompts the server had seen (a repeated --prompt-seed?)"
            detail += f": TTFT is flattered, prefill was skipped for {share:.0%} of the prompt tokens ({why})"
        self.check(Check("prefix_cache_hits", f"{share:.1%}", f"<= {PREFIX_HIT_WARN:.0%}", verdict, "", detail))

    def _physics(self) -> None:
        """Decode tokens/s per sequence (1 / TPOT p50 at the lowest concurrency) against the planner's bound."""
        bound = self.config.plan.decode_bound_tokens_per_s
        runs = [lv for lv in self.outcome.levels if lv.summary.tpot is not None]
        if bound is None or not runs:
            return
        run = min(runs, key=lambda lv: lv.concurrency)
        assert run.summary.tpot is not None
        tpot = run.summary.tpot.p50
        if tpot <= 0:
            return
        rate = 1 / tpot
        share = rate / bound
        self.server["decode"] = {"concurrency": run.concurrency, "tokens_per_s_per_sequence": rate, "bound": bound, "share": share}
        detail = (
            f"{share:.1%} of the planner's memory-bandwidth bound {bound:g} tokens/s (batch 1, context max_model_len) "
            f"at concurrency {run.concurrency}"
        )
        verdict = Verdict.INFO
        if share > 1.05:
            verdict = Verdict.WARN
            detail += ": faster than the bound, the profile's bandwidth (or the plan's sizes) look wrong"
        self.check(Check("decode_vs_bandwidth_bound", round(rate, 2), f"<= {bound:g}", verdict, "tokens/s", detail))

    def _client_cpu(self) -> None:
        """How busy the client itself was: near one core, the figures may be the client's, not the server's."""
        run = self.outcome.target_level
        if run is None or run.summary.duration_s <= 0:
            return
        worst = max(self.outcome.levels, key=lambda lv: lv.client_cpu_share)
        share = worst.client_cpu_share
        detail = f"client CPU time ÷ wall time, highest at concurrency {worst.concurrency}"
        verdict = Verdict.INFO
        if share > CLIENT_CPU_WARN:
            verdict = Verdict.WARN
            detail += ": the client was near one core's limit, the figures may understate the server"
        self.check(Check("client_cpu", f"{share:.0%}", f"< {CLIENT_CPU_WARN:.0%}", verdict, "", detail))

    # -- 7. regression --------------------------------------------------------------------------

    def regression(self, current_load: Mapping[str, Any]) -> None:
        directory = self.config.history_dir
        if directory is None:
            return
        found = history.find_baseline(directory, self.config.instance, self.config.url, self.outcome.run_id)
        info: dict[str, Any] = {"dir": directory, "scanned": found.scanned, "skipped": found.skipped, "baseline": None}
        self.outcome.history = info
        base = found.baseline
        if base is None:
            self.check(Check("regression", None, None, Verdict.INFO, "", f"no earlier passing result of this instance in {directory}"))
            return
        info["baseline"] = {"path": base.path, "started_at": base.started_at, "generation": base.generation}
        why = history.not_comparable(current_load, self.outcome.model, base)
        if why is not None:
            self.check(Check("regression", None, None, Verdict.INFO, "", f"not comparable with {base.path}: {why}"))
            return
        for c in history.compare(current_load, base, self.config.regression_tolerance):
            self.check(c)


async def run(config: VerifyConfig, progress: Progress | None = None) -> Outcome:
    """Run every step; an error that stops the run is recorded in ``Outcome.error``."""
    t0 = time.monotonic()
    try:
        r = _Run(config, progress)
    except VerifyError as exc:
        out = Outcome(config, dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))
        out.error = str(exc)
        return out
    try:
        await r.wait_ready()
        mml = await r.check_models()
        await r.check_key_required()
        r.check_kv_cache(await scrape(r.conn))
        await r.context_probe(mml)
        await r.context_ladder(mml)
        await r.load(mml)
        target = r.outcome.target_level
        if target is not None:
            r.regression(target.as_dict(config.load.prompt_tokens, config.load.output_tokens))
    except VerifyError as exc:
        r.outcome.error = one_line(str(exc), 500)
    finally:
        r.conn.close()
        r.outcome.duration_s = time.monotonic() - t0
    return r.outcome
