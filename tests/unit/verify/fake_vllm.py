"""A small aiohttp server on 127.0.0.1 that speaks the part of vLLM's API verify uses.

``Behaviour`` picks how it misbehaves. Its toy tokenizer counts a BOS token plus, per
whitespace-separated word, ``1 + len(word) // 5`` tokens, so prompt building must search.
The server runs in its own thread and event loop, so tests (and subprocesses) can call it
synchronously.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass
class Behaviour:
    model: str = "tiny-llama"
    max_model_len: int = 2048
    health: str = "ok"  # ok | 503 | hang | trickle (200, then a body of one byte every 0.2 s, forever)
    # good | 500 | 429 | hang | cut | abort | malformed | no_usage | short | error_event, and hostile streams:
    # trickle (a byte every 0.2 s, forever), endless (content events as fast as it can, forever),
    # huge_error (HTTP 500 with a 64 MiB body)
    completions: str = "good"
    ttft_delay: float = 0.0
    token_delay: float = 0.0
    tokens_per_chunk: int = 1
    api_key: str | None = None
    num_gpu_blocks: int = 1024
    block_size: int = 16
    metrics: bool = True
    bad_after: int = 0  # misbehave only from this (0-based) streamed completion on (non-streamed ones: only when 0)
    refuse_over: int | None = None  # refuse prompts longer than this though /v1/models says more
    fail_over: int | None = None  # answer HTTP 500 to prompts longer than this (a server that breaks)
    overlong: str = "refuse"  # refuse (HTTP 400 like vLLM) | accept (answer, truncating) | 500
    root: str = "/models/x"  # what /v1/models says the model was loaded from
    counter_extra_tokens: int = 0  # generation tokens the counter adds per streamed request (other traffic)
    max_parallel: int | None = None  # streams served at once; more wait (throughput stops growing there)


def toy_token_keys(text: str) -> list[tuple[str, int]]:
    """What each toy token stands for (its word and place in the word): the prefix cache's identity."""
    return [("<s>", 0)] + [(word, j) for word in text.split() for j in range(1 + len(word) // 5)]


def toy_tokens(text: str) -> list[int]:
    """The ids: BOS 1, then ``100 + len(word) % 50`` for each of a word's tokens."""
    return [1] + [100 + len(word) % 50 for word, _ in toy_token_keys(text)[1:]]


@dataclass
class State:
    generation_tokens: int = 0
    prompt_tokens: int = 0
    request_success: int = 0
    ttft: list[float] = field(default_factory=list)
    prompt_lengths: list[int] = field(default_factory=list)  # of streamed completions
    prompts: list[str] = field(default_factory=list)  # of streamed completions
    completion_requests: int = 0
    stream_requests: int = 0
    authorizations: list[str | None] = field(default_factory=list)
    prefix_blocks: set[int] = field(default_factory=set)  # hashes of the full blocks seen (each chained to its prefix)
    prefix_queries: int = 0
    prefix_hits: int = 0


def _error(status: int, message: str, kind: str) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    return web.json_response(body, status=status)


class FakeVllm:
    def __init__(self, behaviour: Behaviour | None = None) -> None:
        self.b = behaviour or Behaviour()
        self.state = State()
        self.gate: asyncio.Semaphore | None = None
        self.app = web.Application()
        self.app.router.add_get("/health", self.health)
        self.app.router.add_get("/version", self.version)
        self.app.router.add_get("/v1/models", self.models)
        self.app.router.add_post("/tokenize", self.tokenize)
        self.app.router.add_post("/v1/completions", self.completions)
        self.app.router.add_get("/metrics", self.metrics)

    def _denied(self, request: web.Request) -> web.Response | None:
        self.state.authorizations.append(request.headers.get("Authorization"))
        if self.b.api_key is not None and request.headers.get("Authorization") != f"Bearer {self.b.api_key}":
            return _error(401, "Unauthorized", "Unauthorized")
        return None

    async def health(self, request: web.Request) -> web.StreamResponse:
        if self.b.health == "hang":
            await asyncio.sleep(3600)
        if self.b.health == "trickle":
            return await _trickle(request, web.StreamResponse(status=200))
        if self.b.health != "ok":
            return web.Response(status=503, text="loading")
        return web.Response(status=200)

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": "0.32.0-fake"})

    async def models(self, request: web.Request) -> web.Response:
        if denied := self._denied(request):
            return denied
        entry = {"id": self.b.model, "object": "model", "owned_by": "vllm", "root": self.b.root, "max_model_len": self.b.max_model_len}
        return web.json_response({"object": "list", "data": [entry]})

    async def tokenize(self, request: web.Request) -> web.Response:
        body = await request.json()
        tokens = toy_tokens(body["prompt"])
        return web.json_response({"count": len(tokens), "max_model_len": self.b.max_model_len, "tokens": tokens})

    def _chunk(self, text: str, finish: str | None) -> bytes:
        obj = {
            "id": "cmpl-1",
            "object": "text_completion",
            "created": 1700000000,
            "model": self.b.model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish, "stop_reason": None}],
        }
        return b"data: " + json.dumps(obj).encode() + b"\n\n"

    async def completions(self, request: web.Request) -> web.StreamResponse:
        if denied := self._denied(request):
            return denied
        body = await request.json()
        self.state.completion_requests += 1
        index = self.state.stream_requests if body.get("stream") else 0
        self.state.stream_requests += 1 if body.get("stream") else 0
        if body.get("model") != self.b.model:
            return _error(404, f"The model `{body.get('model')}` does not exist.", "NotFoundError")
        prompt_tokens = len(toy_tokens(body["prompt"]))
        mml = self.b.max_model_len
        if self.b.fail_over is not None and prompt_tokens > self.b.fail_over:
            return _error(500, "CUDA out of memory", "InternalServerError")
        if prompt_tokens >= mml and self.b.overlong == "500":
            return _error(500, "index out of range", "InternalServerError")
        if prompt_tokens > min(mml, self.b.refuse_over or mml) and self.b.overlong != "accept":
            msg = f"This model's maximum context length is {mml} tokens. However, your prompt contains {prompt_tokens} input tokens"
            return _error(400, msg, "BadRequestError")
        want = int(body.get("max_tokens", 16))
        n = min(want, mml - prompt_tokens)
        if n < 1:  # vLLM 0.32: a prompt of max_model_len tokens leaves no room for output
            if self.b.overlong != "accept":
                return _error(400, f"max_tokens must be at least 1, got {n}.", "BadRequestError")
            n = 1
        self._prefix_cache(body["prompt"])
        bad = self.b.completions if index >= self.b.bad_after else "good"
        if bad == "short":
            n = max(1, n // 2)
        if bad == "500":
            return _error(500, "EngineCore encountered an issue", "InternalServerError")
        if bad == "429":
            return _error(429, "Too many requests", "RateLimitError")
        if body.get("stream") and bad in HOSTILE:
            return await HOSTILE[bad](self, request)
        if not body.get("stream"):
            await asyncio.sleep(self.b.ttft_delay)
            self._count(prompt_tokens, n, self.b.ttft_delay)
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}
            choice = {"index": 0, "text": " x" * n, "finish_reason": "length", "logprobs": None}
            return web.json_response({"id": "cmpl-1", "object": "text_completion", "choices": [choice], "usage": usage})

        if self.b.max_parallel is not None:
            if self.gate is None:
                self.gate = asyncio.Semaphore(self.b.max_parallel)
            async with self.gate:
                return await self._stream(request, body, prompt_tokens, n, bad)
        return await self._stream(request, body, prompt_tokens, n, bad)

    async def _stream(self, request: web.Request, body: dict[str, Any], prompt_tokens: int, n: int, bad: str) -> web.StreamResponse:
        self.state.prompt_lengths.append(prompt_tokens)
        self.state.prompts.append(body["prompt"])
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await resp.prepare(request)
        t0 = time.perf_counter()
        await asyncio.sleep(self.b.ttft_delay)
        sent = 0
        first = True
        while sent < n:
            k = min(self.b.tokens_per_chunk, n - sent)
            sent += k
            if first:
                self.state.ttft.append(time.perf_counter() - t0)
                first = False
            await resp.write(self._chunk(" tok" * k, "length" if sent == n else None))
            if sent >= 2 and bad in ("hang", "cut", "abort", "malformed", "error_event"):
                break
            if self.b.token_delay:
                await asyncio.sleep(self.b.token_delay)
        if bad == "hang":
            await asyncio.sleep(3600)
        if bad == "cut":
            return resp  # a clean end of the chunked body, without usage or [DONE]
        if bad == "abort":
            assert request.transport is not None
            request.transport.abort()
            return resp
        if bad == "malformed":
            await resp.write(b'data: {"choices": [{"text": "x", \n\n')
            return resp
        if bad == "error_event":
            await resp.write(b'data: {"error": {"message": "engine died", "code": 500}}\n\n')
            return resp
        if bad != "no_usage":
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}
            obj = {"id": "cmpl-1", "object": "text_completion", "created": 1700000000, "model": self.b.model, "choices": [], "usage": usage}
            await resp.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        self._count(prompt_tokens, n + self.b.counter_extra_tokens, None)
        await resp.write_eof()
        return resp

    def _prefix_cache(self, prompt: str) -> None:
        """As vLLM's automatic prefix caching: full blocks of the prompt, each keyed by all tokens up to its end;
        the leading run of blocks already held counts as hits."""
        keys = toy_token_keys(prompt)
        bs = self.b.block_size
        self.state.prefix_queries += len(keys)
        h, hit = 0, True
        for end in range(bs, len(keys) + 1, bs):
            h = hash((h, tuple(keys[end - bs : end])))
            if hit and h in self.state.prefix_blocks:
                self.state.prefix_hits += bs
            else:
                hit = False
            self.state.prefix_blocks.add(h)

    def _count(self, prompt_tokens: int, output_tokens: int, ttft: float | None) -> None:
        self.state.prompt_tokens += prompt_tokens
        self.state.generation_tokens += output_tokens
        self.state.request_success += 1
        if ttft is not None:
            self.state.ttft.append(ttft)

    async def metrics(self, request: web.Request) -> web.Response:
        if not self.b.metrics:
            return web.Response(status=404, text="404: Not Found")
        lab = f'engine="0",model_name="{self.b.model}"'
        lines = [
            "# HELP vllm:generation_tokens_total Number of generation tokens processed.",
            "# TYPE vllm:generation_tokens_total counter",
            f"vllm:generation_tokens_total{{{lab}}} {float(self.state.generation_tokens)}",
            "# TYPE vllm:prompt_tokens_total counter",
            f"vllm:prompt_tokens_total{{{lab}}} {float(self.state.prompt_tokens)}",
            "# TYPE vllm:prefix_cache_queries_total counter",
            f"vllm:prefix_cache_queries_total{{{lab}}} {float(self.state.prefix_queries)}",
            "# TYPE vllm:prefix_cache_hits_total counter",
            f"vllm:prefix_cache_hits_total{{{lab}}} {float(self.state.prefix_hits)}",
            "# TYPE vllm:request_success_total counter",
            f'vllm:request_success_total{{{lab},finished_reason="length"}} {float(self.state.request_success)}',
            "# TYPE vllm:time_to_first_token_seconds histogram",
        ]
        for le in (*TTFT_BUCKETS, float("inf")):
            n = sum(1 for t in self.state.ttft if t <= le)
            le_text = "+Inf" if le == float("inf") else repr(le)
            lines.append(f'vllm:time_to_first_token_seconds_bucket{{{lab},le="{le_text}"}} {float(n)}')
        lines.append(f"vllm:time_to_first_token_seconds_count{{{lab}}} {float(len(self.state.ttft))}")
        lines.append(f"vllm:time_to_first_token_seconds_sum{{{lab}}} {sum(self.state.ttft)}")
        lines.append("# TYPE vllm:cache_config_info gauge")
        lines.append(
            f'vllm:cache_config_info{{block_size="{self.b.block_size}",cache_dtype="auto",engine="0",'
            f'num_cpu_blocks="None",num_gpu_blocks="{self.b.num_gpu_blocks}",prefix_caching_hash_algo="sha256"}} 1.0'
        )
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")


async def _trickle(request: web.Request, resp: web.StreamResponse) -> web.StreamResponse:
    """Headers, then one byte every 0.2 s until the client hangs up: every idle timeout is met."""
    await resp.prepare(request)
    with contextlib.suppress(ConnectionError):
        while True:
            await resp.write(b"x")
            await asyncio.sleep(0.2)
    return resp


async def _endless(fake: FakeVllm, request: web.Request) -> web.StreamResponse:
    """Valid content events, as fast as the client reads them, never a [DONE]."""
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
    await resp.prepare(request)
    block = fake._chunk(" tok", None) * 1000
    with contextlib.suppress(ConnectionError):
        while True:
            await resp.write(block)
    return resp


HUGE_ERROR_BYTES = 64 << 20


async def _huge_error(fake: FakeVllm, request: web.Request) -> web.StreamResponse:
    """An HTTP 500 whose body is 64 MiB (written 1 MiB at a time: the server holds little)."""
    resp = web.StreamResponse(status=500, headers={"Content-Type": "text/plain", "Content-Length": str(HUGE_ERROR_BYTES)})
    await resp.prepare(request)
    piece = b"engine failed " + b"x" * ((1 << 20) - 14)
    with contextlib.suppress(ConnectionError):
        for _ in range(HUGE_ERROR_BYTES >> 20):
            await resp.write(piece)
    return resp


HOSTILE = {
    "trickle": lambda fake, request: _trickle(request, web.StreamResponse(headers={"Content-Type": "text/event-stream"})),
    "endless": _endless,
    "huge_error": _huge_error,
}


async def _shutdown(runner: web.AppRunner) -> None:
    await runner.cleanup()
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for t in others:
        t.cancel()
    await asyncio.gather(*others, return_exceptions=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def serve(behaviour: Behaviour | None = None) -> Iterator[tuple[str, FakeVllm]]:
    """Run a FakeVllm in a thread; yield its base URL and the server object."""
    fake = FakeVllm(behaviour)
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(fake.app, access_log=None, shutdown_timeout=0.2)
    ready = threading.Event()
    port: list[int] = []

    async def start() -> None:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        addr: Any = runner.addresses[0]
        port.append(addr[1])
        ready.set()

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    try:
        yield f"http://127.0.0.1:{port[0]}", fake
    finally:
        asyncio.run_coroutine_threadsafe(_shutdown(runner), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
