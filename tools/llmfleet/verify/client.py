"""The client side of a run: the requests it sends the server, and what each answer means.

An answer becomes a value or a one-line error (:func:`error_message`); a streaming completion's
events are read as they arrive (:func:`stream_completion`, figures as :mod:`llmfleet.verify.metrics`
defines them). The connection is :mod:`llmfleet.verify.httpclient`'s, the event framing :mod:`llmfleet.verify.sse`'s.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from . import prometheus
from .errors import VerifyError
from .httpclient import Connection, HttpError, ProtocolError, Response
from .metrics import RequestResult
from .sse import SseParser

COMPLETIONS = "/v1/completions"


def one_line(text: str, limit: int = 300) -> str:
    """``text`` on one line (white space folded), cut to ``limit`` characters."""
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
            return one_line(str(err["message"]))
        if isinstance(err, str) and err:
            return one_line(err)
        if obj.get("message"):
            return one_line(str(obj["message"]))
        if obj.get("detail"):
            return one_line(str(obj["detail"]))
    return one_line(resp.body.decode("utf-8", "replace")) or resp.reason or "no message"


def json_body(resp: Response, what: str) -> Any:
    """The JSON of ``what``'s answer; malformed JSON ends the run."""
    try:
        return json.loads(resp.body)
    except ValueError:
        raise VerifyError(f"{what} answered malformed JSON: {one_line(resp.body[:80].decode('utf-8', 'replace'))!r}") from None


def _count_of(usage: object, key: str) -> int | None:
    if not isinstance(usage, dict):
        return None
    v = usage.get(key)
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None


async def get(conn: Connection, path: str) -> Response:
    """A GET whose failure to get an answer ends the run."""
    try:
        return await conn.request("GET", path)
    except HttpError as exc:
        raise VerifyError(str(exc)) from None


async def _post_json(conn: Connection, path: str, payload: Mapping[str, Any]) -> Response:
    try:
        return await conn.request("POST", path, json.dumps(payload).encode())
    except HttpError as exc:
        raise VerifyError(str(exc)) from None


async def token_count(conn: Connection, model: str, text: str) -> int:
    """How many tokens ``text`` is for ``model``, as ``POST /tokenize`` counts them."""
    resp = await _post_json(conn, "/tokenize", {"model": model, "prompt": text})
    if resp.status != 200:
        raise VerifyError(f"POST /tokenize answered HTTP {resp.status}: {error_message(resp)}")
    obj = json_body(resp, "POST /tokenize")
    count = obj.get("count") if isinstance(obj, dict) else None
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise VerifyError("POST /tokenize answered no integer 'count'")
    return count


@dataclass(frozen=True, slots=True)
class Answer:
    """One non-streaming completion: the status, and usage or the error message."""

    status: int | None  # None: no HTTP answer (the reason is in ``error``)
    latency_s: float
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    finish_reason: str | None = None
    error: str | None = None


async def complete(conn: Connection, model: str | None, prompt: str, max_tokens: int) -> Answer:
    """One non-streaming completion; a server error is an answer, a broken transport is too."""
    payload = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0.0}
    t0 = time.perf_counter()
    try:
        resp = await conn.request("POST", COMPLETIONS, json.dumps(payload).encode())
    except HttpError as exc:
        return Answer(None, time.perf_counter() - t0, error=str(exc))
    elapsed = time.perf_counter() - t0
    if resp.status != 200:
        return Answer(resp.status, elapsed, error=error_message(resp))
    obj = json_body(resp, f"POST {COMPLETIONS}")
    usage = obj.get("usage") if isinstance(obj, dict) else None
    pt, ct = _count_of(usage, "prompt_tokens"), _count_of(usage, "completion_tokens")
    if pt is None or ct is None:
        raise VerifyError(f"POST {COMPLETIONS} answered no usage counts")
    choices = obj.get("choices")
    reason = choices[0].get("finish_reason") if isinstance(choices, list) and choices and isinstance(choices[0], dict) else None
    return Answer(200, elapsed, pt, ct, reason if isinstance(reason, str) else None)


async def scrape(conn: Connection) -> prometheus.Exposition | str:
    """The server's metrics, or why they could not be read."""
    try:
        resp = await conn.request("GET", "/metrics")
    except HttpError as exc:
        return str(exc)
    if resp.status != 200:
        return f"GET /metrics answered HTTP {resp.status}"
    try:
        return prometheus.parse(resp.body.decode("utf-8", "replace"))
    except prometheus.PromParseError as exc:
        return f"GET /metrics: {exc}"


_DECODER = json.JSONDecoder()
_loads = _DECODER.decode
#: the C scanner behind json.loads, minus its Python wrappers and two regex matches: this runs per event
_scan: Callable[[str, int], tuple[object, int]] = _DECODER.scan_once  # type: ignore[attr-defined]


def _parse_event(data: bytes) -> object:
    """One event's JSON when the fast scan failed: surrounding whitespace is fine; else ProtocolError."""
    try:  # the slow path: leading or trailing whitespace is fine; otherwise the decoder's own message
        return _loads(data.decode())
    except ValueError as exc:
        raise ProtocolError(f"malformed SSE: invalid JSON in event ({exc}): {data[:60]!r}") from None


#: events a completion stream may send beyond one per output token (a final chunk, usage, [DONE], ...)
STREAM_EVENT_SLACK = 16


class _Stream:
    """Consumes the SSE events of one streaming completion (see the metrics module for definitions).

    A stream sends at most one content event per output token: one that sends more than
    ``max_tokens + STREAM_EVENT_SLACK`` events is refused at once, so an endless stream costs
    neither the request's deadline nor memory (its inter-token gaps are kept)."""

    __slots__ = ("done", "events", "finish_reason", "first", "itl", "last", "max_events", "output_tokens", "prompt_tokens", "usage_seen")

    def __init__(self, max_tokens: int = 0) -> None:
        self.max_events = max_tokens + STREAM_EVENT_SLACK
        self.events = 0
        self.done = False
        self.first: float | None = None
        self.last = 0.0
        self.itl: list[float] = []
        self.finish_reason: str | None = None
        self.usage_seen = False
        self.prompt_tokens: int | None = None
        self.output_tokens: int | None = None

    def on_events(self, events: list[bytes], t: float) -> None:
        """The events one read completed (all seen at time ``t``); the hot loop of a load."""
        itl = self.itl
        scan = _scan
        self.events += len(events)
        if self.events > self.max_events:
            raise ProtocolError(
                f"stream sent more events than {self.max_events} (max_tokens {self.max_events - STREAM_EVENT_SLACK} + {STREAM_EVENT_SLACK})"
            )
        for data in events:
            if self.done:
                raise ProtocolError("malformed SSE: event after [DONE]")
            if data == b"[DONE]":
                self.done = True
                continue
            try:  # inline: this runs once per token
                text = data.decode()
                obj, end = scan(text, 0)
                if end != len(text):
                    obj = _parse_event(data)
            except (ValueError, StopIteration):  # UnicodeDecodeError included
                obj = _parse_event(data)
            if type(obj) is not dict:
                raise ProtocolError(f"malformed SSE: event is not a JSON object: {data[:60]!r}")
            choices = obj.get("choices")
            if choices:
                if type(choices) is not list or type(choices[0]) is not dict:
                    raise ProtocolError(f"malformed SSE: 'choices' is not a list of objects: {data[:60]!r}")
                if self.first is None:
                    self.first = t
                else:
                    itl.append(t - self.last)
                self.last = t
                reason = choices[0].get("finish_reason")
                if reason is not None:
                    self.finish_reason = str(reason)
            if obj.get("error"):
                err = obj["error"]
                msg = err.get("message") if isinstance(err, dict) else err
                raise ProtocolError(f"error event in stream: {one_line(str(msg))}")
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
    st = _Stream(max_tokens)
    parser = SseParser(on_batch=st.on_events)
    sent = time.perf_counter()
    try:
        resp = await conn.request("POST", COMPLETIONS, body, sink=parser.feed)
        if resp.status == 200:
            parser.finish()
    except HttpError as exc:
        return RequestResult(max_tokens, error=str(exc))
    if resp.status != 200:
        return RequestResult(max_tokens, error=f"HTTP {resp.status} from POST {COMPLETIONS}: {error_message(resp)}", status=resp.status)
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
