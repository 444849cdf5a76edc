"""One verify run against a live vLLM OpenAI-compatible server.

Steps, in order; the first that cannot measure ends the run with a :class:`VerifyError`:

1. wait for ``/health`` (bounded by ``ready_timeout``);
2. ``/v1/models``: the served model id and its ``max_model_len`` (≥ ``min_context_tokens``);
3. ``/metrics``: KV-cache capacity from ``vllm:cache_config_info``;
4. full-context probe: a prompt of exactly ``min_context_tokens − 4`` tokens (counted with
   ``/tokenize``) and ``max_tokens = 4``, non-streaming, must be answered in full;
5. the fixed streaming load (``load``), between two ``/metrics`` scrapes whose counter deltas are
   compared with the client's own counts.

Figures are defined in :mod:`llmfleet.verify.metrics`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import time
from collections import Counter
from collections.abc import Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from . import prometheus
from .checks import Check, Verdict, agrees, at_least, at_most
from .config import VerifyConfig
from .errors import ExitCode, VerifyError
from .httpclient import Connection, Endpoint, HttpError, ProtocolError, Response, Timeouts, seconds
from .metrics import LoadSummary, RequestResult, summarize
from .prompts import PromptBuilder
from .sse import SseParser

COMPLETIONS = "/v1/completions"
#: server histograms compared with the client's distributions (first name found wins)
SERVER_HISTOGRAMS: dict[str, tuple[str, ...]] = {
    "ttft_s": ("vllm:time_to_first_token_seconds",),
    "itl_s": ("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds"),
    "tpot_s": ("vllm:request_time_per_output_token_seconds",),
    "e2el_s": ("vllm:e2e_request_latency_seconds",),
}
GENERATION_TOKENS = "vllm:generation_tokens_total"
PROMPT_TOKENS = "vllm:prompt_tokens_total"


class Progress(Protocol):
    def start(self, total: int) -> None: ...
    def advance(self, result: RequestResult) -> None: ...
    def stop(self) -> None: ...


@dataclass
class Outcome:
    """Everything a run found; :mod:`llmfleet.verify.report` renders it."""

    config: VerifyConfig
    started_at: str
    model: str | None = None
    checks: list[Check] = field(default_factory=list)
    load: LoadSummary | None = None
    load_errors: list[tuple[str, int]] = field(default_factory=list)
    server: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def exit_code(self) -> ExitCode:
        if self.error is not None:
            return ExitCode.ERROR
        if any(c.verdict is Verdict.FAIL for c in self.checks):
            return ExitCode.TARGET_MISSED
        return ExitCode.OK


def _one_line(text: str, limit: int = 300) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def error_message(resp: Response) -> str:
    """The message of an error response (OpenAI/vLLM ``{"error": {"message"}}`` or older shapes)."""
    try:
        obj = json.loads(resp.body)
    except ValueError:
        obj = None
    if isinstance(obj, dict):
        err = obj.get("error")
        if isinstance(err, dict) and err.get("message"):
            return _one_line(str(err["message"]))
        if isinstance(err, str) and err:
            return _one_line(err)
        if obj.get("message"):
            return _one_line(str(obj["message"]))
        if obj.get("detail"):
            return _one_line(str(obj["detail"]))
    return _one_line(resp.body.decode("utf-8", "replace")) or resp.reason or "no message"


def _json(resp: Response, what: str) -> Any:
    try:
        return json.loads(resp.body)
    except ValueError:
        raise VerifyError(f"{what} answered malformed JSON: {_one_line(resp.body[:80].decode('utf-8', 'replace'))!r}") from None


def _count_of(usage: object, key: str) -> int | None:
    if not isinstance(usage, dict):
        return None
    v = usage.get(key)
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None


_loads = json.JSONDecoder().decode  # json.loads minus its per-call checks: this runs per event


class _Stream:
    """Consumes the SSE events of one streaming completion (see the metrics module for definitions)."""

    __slots__ = ("done", "finish_reason", "first", "itl", "last", "output_tokens", "prompt_tokens", "usage_seen")

    def __init__(self) -> None:
        self.done = False
        self.first: float | None = None
        self.last = 0.0
        self.itl: list[float] = []
        self.finish_reason: str | None = None
        self.usage_seen = False
        self.prompt_tokens: int | None = None
        self.output_tokens: int | None = None

    def on_event(self, data: bytes, t: float) -> None:
        if self.done:
            raise ProtocolError("malformed SSE: event after [DONE]")
        if data == b"[DONE]":
            self.done = True
            return
        try:
            obj = _loads(data.decode())
        except ValueError as exc:  # UnicodeDecodeError included
            raise ProtocolError(f"malformed SSE: invalid JSON in event ({exc}): {data[:60]!r}") from None
        if not isinstance(obj, dict):
            raise ProtocolError(f"malformed SSE: event is not a JSON object: {data[:60]!r}")
        if obj.get("error"):
            err = obj["error"]
            msg = err.get("message") if isinstance(err, dict) else err
            raise ProtocolError(f"error event in stream: {_one_line(str(msg))}")
        choices = obj.get("choices")
        if choices:
            if not isinstance(choices, list) or not isinstance(choices[0], dict):
                raise ProtocolError(f"malformed SSE: 'choices' is not a list of objects: {data[:60]!r}")
            if self.first is None:
                self.first = t
            else:
                self.itl.append(t - self.last)
            self.last = t
            reason = choices[0].get("finish_reason")
            if reason is not None:
                self.finish_reason = str(reason)
        usage = obj.get("usage")
        if usage:
            self.prompt_tokens = _count_of(usage, "prompt_tokens")
            self.output_tokens = _count_of(usage, "completion_tokens")
            if self.output_tokens is None:
                raise ProtocolError(f"malformed SSE: usage without an integer completion_tokens: {data[:80]!r}")
            self.usage_seen = True


async def stream_completion(conn: Connection, model: str, prompt: str, max_tokens: int) -> RequestResult:
    """One streaming completion with a fixed output length; never raises for the server's faults."""
    body = json.dumps(
        {
            "model": model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()
    st = _Stream()
    parser = SseParser(st.on_event)
    sent = time.perf_counter()
    try:
        resp = await conn.request("POST", COMPLETIONS, body, sink=parser.feed)
        if resp.status == 200:
            parser.finish()
    except HttpError as exc:
        return RequestResult(max_tokens, error=str(exc))
    if resp.status != 200:
        return RequestResult(max_tokens, error=f"HTTP {resp.status} from POST {COMPLETIONS}: {error_message(resp)}")
    if not st.done:
        if resp.content_type != "text/event-stream":
            return RequestResult(max_tokens, error=f"expected text/event-stream, got {resp.content_type or 'no content type'}")
        return RequestResult(max_tokens, error="stream ended before [DONE]")
    if st.first is None:
        return RequestResult(max_tokens, error="stream had no content chunk")
    if not st.usage_seen:
        return RequestResult(max_tokens, error="stream had no usage event (stream_options.include_usage ignored?)")
    return RequestResult(
        max_tokens,
        ttft=st.first - sent,
        itl=tuple(st.itl),
        latency=st.last - sent,
        output_tokens=st.output_tokens,
        prompt_tokens=st.prompt_tokens,
        finish_reason=st.finish_reason,
    )


def _auth_headers(config: VerifyConfig) -> dict[str, str]:
    if config.api_key_env is None:
        return {}
    key = os.environ.get(config.api_key_env, "")
    if not key:
        raise VerifyError(f"environment variable {config.api_key_env} (the API key) is not set or empty")
    if any(c in key for c in "\r\n\0"):
        raise VerifyError(f"environment variable {config.api_key_env} holds an invalid API key (control characters)")
    return {"Authorization": f"Bearer {key}"}


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
    conns: Sequence[Connection], model: str, prompts: Sequence[str], output_tokens: int, progress: Progress | None = None
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
        progress.start(len(prompts))
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
        self.headers = _auth_headers(config)
        self.outcome = Outcome(config, dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))
        self.server = self.outcome.server
        self.server["url"] = str(self.endpoint)
        self.conn = self._connection()

    def _connection(self, timeouts: Timeouts | None = None) -> Connection:
        return Connection(self.endpoint, timeouts or self.config.timeouts, self.headers)

    def check(self, c: Check) -> None:
        self.outcome.checks.append(c)

    async def get(self, path: str, conn: Connection | None = None) -> Response:
        try:
            return await (conn or self.conn).request("GET", path)
        except HttpError as exc:
            raise VerifyError(str(exc)) from None

    async def post_json(self, path: str, payload: Mapping[str, Any], conn: Connection | None = None) -> Response:
        try:
            return await (conn or self.conn).request("POST", path, json.dumps(payload).encode())
        except HttpError as exc:
            raise VerifyError(str(exc)) from None

    # -- 1. ready -------------------------------------------------------------------------------

    async def wait_ready(self) -> None:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        limit = self.config.ready_timeout
        deadline = t0 + limit
        base = self.config.timeouts
        delay = 0.2
        while True:
            # each probe's limits are capped by the time left (at least 0.5 s: a zero wait still probes once)
            remaining = max(deadline - loop.time(), 0.5)
            probe = Timeouts(min(base.connect, remaining), min(base.first_byte, remaining), min(base.idle, remaining))
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
        resp = await self.get("/v1/models")
        if resp.status != 200:
            raise VerifyError(f"GET /v1/models answered HTTP {resp.status}: {error_message(resp)}")
        obj = _json(resp, "GET /v1/models")
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
        mml = entry.get("max_model_len")
        mml = mml if isinstance(mml, int) and not isinstance(mml, bool) else None
        self.server["max_model_len"] = mml
        min_ctx = self.config.targets.min_context_tokens
        if mml is None:
            if min_ctx is not None:
                raise VerifyError(f"GET /v1/models gives no max_model_len for {want}: cannot check min_context_tokens")
            return None
        self.check(at_least("max_model_len", mml, min_ctx, "tokens"))
        plan_mml = self.config.plan_max_model_len
        if plan_mml is not None and plan_mml != mml:
            self.check(Check("max_model_len_plan", mml, f"= {plan_mml}", Verdict.WARN, "tokens", "the plan asks for another value"))
        return mml

    # -- 3. metrics -----------------------------------------------------------------------------

    async def scrape(self) -> prometheus.Exposition | str:
        """The server's metrics, or why they could not be read."""
        try:
            resp = await self.conn.request("GET", "/metrics")
        except HttpError as exc:
            return str(exc)
        if resp.status != 200:
            return f"GET /metrics answered HTTP {resp.status}"
        try:
            return prometheus.parse(resp.body.decode("utf-8", "replace"))
        except prometheus.PromParseError as exc:
            return f"GET /metrics: {exc}"

    def _label_match(self) -> dict[str, str]:
        return {"model_name": self.outcome.model} if self.outcome.model else {}

    def check_kv_cache(self, expo: prometheus.Exposition | str) -> None:
        target = self.config.targets.min_kv_cache_tokens
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

    # -- 4. context probe -----------------------------------------------------------------------

    async def count_tokens(self, text: str, conn: Connection | None = None) -> int:
        assert self.outcome.model is not None
        resp = await self.post_json("/tokenize", {"model": self.outcome.model, "prompt": text}, conn)
        if resp.status != 200:
            raise VerifyError(f"POST /tokenize answered HTTP {resp.status}: {error_message(resp)}")
        obj = _json(resp, "POST /tokenize")
        count = obj.get("count") if isinstance(obj, dict) else None
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise VerifyError("POST /tokenize answered no integer 'count'")
        return count

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
        prompt = await PromptBuilder(self.count_tokens).build(n)
        payload = {"model": self.outcome.model, "prompt": prompt, "max_tokens": out, "ignore_eos": True, "temperature": 0.0}
        t0 = time.perf_counter()
        resp = await self.post_json(COMPLETIONS, payload)
        elapsed = time.perf_counter() - t0
        probe: dict[str, Any] = {"prompt_tokens": n, "max_tokens": out, "status": resp.status, "latency_s": round(elapsed, 4)}
        self.server["context_probe"] = probe
        if resp.status >= 500:
            raise VerifyError(f"context probe: POST {COMPLETIONS} answered HTTP {resp.status}: {error_message(resp)}")
        if resp.status != 200:
            msg = error_message(resp)
            probe["error"] = msg
            why = f"{n}+{out} tokens refused: HTTP {resp.status}: {msg}"
            self.check(Check("context_tokens", None, f">= {ctx}", Verdict.FAIL, "tokens", why))
            return
        obj = _json(resp, f"POST {COMPLETIONS}")
        usage = obj.get("usage") if isinstance(obj, dict) else None
        pt, ct = _count_of(usage, "prompt_tokens"), _count_of(usage, "completion_tokens")
        if pt is None or ct is None:
            raise VerifyError(f"context probe: POST {COMPLETIONS} answered no usage counts")
        choices = obj.get("choices")
        reason = choices[0].get("finish_reason") if isinstance(choices, list) and choices and isinstance(choices[0], dict) else None
        probe.update(answered_prompt_tokens=pt, answered_output_tokens=ct, finish_reason=reason)
        detail = f"prompt {pt} + output {ct} tokens, finish_reason {reason}"
        measured = pt + ct
        if ct < out:
            self.check(Check("context_tokens", measured, f">= {ctx}", Verdict.FAIL, "tokens", "cut short: " + detail))
        else:
            self.check(at_least("context_tokens", measured, ctx, "tokens", detail))

    # -- 5. load --------------------------------------------------------------------------------

    async def load(self, max_model_len: int | None) -> None:
        spec = self.config.load
        model = self.outcome.model
        assert model is not None
        if max_model_len is not None and spec.prompt_tokens + spec.output_tokens > max_model_len:
            raise VerifyError(
                f"load does not fit: prompt_tokens {spec.prompt_tokens} + output_tokens {spec.output_tokens}"
                f" > max_model_len {max_model_len} of the server"
            )
        workers = min(spec.concurrency, spec.requests)
        conns = [self._connection() for _ in range(workers)]
        try:
            prompts = await self._build_prompts(conns, spec.prompt_tokens, spec.requests)
            before = await self.scrape()
            results, duration = await run_load(conns, model, prompts, spec.output_tokens, self.progress)
            failed = any(r is not None and r.error is not None for r in results)
            # after a failure the server may be wedged: do not wait on it again for a cross-check
            after = "not read: the load failed" if failed else await self.scrape()
        finally:
            for c in conns:
                c.close()
        summary = summarize(results, duration)
        self.outcome.load = summary
        errors = Counter(r.error for r in results if r is not None and r.error is not None)
        self.outcome.load_errors = errors.most_common()
        self._load_checks(summary, results)
        self._server_counters(summary, before, after)
        if summary.failed:
            first = next(r.error for r in results if r is not None and r.error is not None)
            unsent = f", {summary.not_sent} not sent" if summary.not_sent else ""
            raise VerifyError(f"{summary.failed} of {summary.planned} load requests failed{unsent}; first: {first}")

    async def _build_prompts(self, conns: list[Connection], n: int, count: int) -> list[str]:
        builder = PromptBuilder(self.count_tokens)
        prompts: list[str] = [""] * count
        # the first one alone: it finds the word count the others start from
        prompts[0] = await builder.build(n, 0, lambda text: self.count_tokens(text, conns[0]))
        next_seed = 1

        async def work(conn: Connection) -> None:
            nonlocal next_seed
            while next_seed < count:
                seed = next_seed
                next_seed += 1
                prompts[seed] = await builder.build(n, seed, lambda text: self.count_tokens(text, conn))

        await _all(work(conn) for conn in conns)
        return prompts

    def _load_checks(self, s: LoadSummary, results: list[RequestResult | None]) -> None:
        t = self.config.targets
        short = [r for r in results if r is not None and r.cut_short]
        detail = f"{s.cut_short} cut short, {s.failed} failed, {s.not_sent} not sent"
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

    def _server_counters(self, s: LoadSummary, before: prometheus.Exposition | str, after: prometheus.Exposition | str) -> None:
        info: dict[str, Any] = {}
        self.server["load_metrics"] = info
        if isinstance(before, str) or isinstance(after, str):
            info["error"] = before if isinstance(before, str) else after
            return
        match = self._label_match()

        def delta(name: str) -> float | None:
            a, b = after.total(name, match), before.total(name, match)
            return None if a is None or b is None else a - b

        gen, prompt = delta(GENERATION_TOKENS), delta(PROMPT_TOKENS)
        info["generation_tokens_delta"] = gen
        info["prompt_tokens_delta"] = prompt
        info["request_success_delta"] = delta("vllm:request_success_total")
        info["preemptions_delta"] = delta("vllm:num_preemptions_total")
        hist: dict[str, Any] = {}
        for key, names in SERVER_HISTOGRAMS.items():
            for name in names:
                h1, h0 = after.histogram(name, match), before.histogram(name, match)
                if h1 is not None and h0 is not None:
                    d = h1 - h0
                    hist[key] = {"metric": name, "count": d.count, "mean": d.mean, "p95_estimate": d.quantile(0.95)}
                    break
        info["histograms"] = hist
        if s.failed == 0:
            self.check(agrees("server_generation_tokens", gen, s.output_tokens, f"{GENERATION_TOKENS} delta vs client usage"))
            self.check(agrees("server_prompt_tokens", prompt, s.prompt_tokens, f"{PROMPT_TOKENS} delta vs client usage"))


async def run(config: VerifyConfig, progress: Progress | None = None) -> Outcome:
    """Run every step; an error that stops the run is recorded in ``Outcome.error``."""
    try:
        r = _Run(config, progress)
    except VerifyError as exc:
        out = Outcome(config, dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))
        out.error = str(exc)
        return out
    try:
        await r.wait_ready()
        mml = await r.check_models()
        r.check_kv_cache(await r.scrape())
        await r.context_probe(mml)
        await r.load(mml)
    except VerifyError as exc:
        r.outcome.error = _one_line(str(exc), 500)
    finally:
        r.conn.close()
    return r.outcome
