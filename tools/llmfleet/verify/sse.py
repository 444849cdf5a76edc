"""Server-sent events: split a ``text/event-stream`` body into the data of each event.

Per the WHATWG SSE rules: lines end in LF or CRLF; ``data:`` lines of one event are joined
with LF (one leading space after the colon is dropped); a blank line dispatches the event;
comments (``:``) and other fields (``event:``, ``id:``, ``retry:``) are ignored here. vLLM sends
one ``data: {json}`` event per chunk and ends with ``data: [DONE]``.
"""

from __future__ import annotations

from collections.abc import Callable

from .httpclient import ProtocolError

#: receives an event's data and the perf_counter time of the read that completed it
EventSink = Callable[[bytes, float], None]
#: receives the data of every event one read completed, in order, and the time of that read
BatchSink = Callable[[list[bytes], float], None]

#: an event (or a line without its end) larger than this is refused: a stream cannot make a
#: connection hold more (vLLM's completion events are a few hundred bytes)
MAX_EVENT_BYTES = 1 << 20


class SseParser:
    """Feed it body bytes; it hands on each complete event's data, one call per read (``on_batch``)
    or per event (``on_event``). Batching keeps the per-event cost of a fast stream low."""

    __slots__ = ("_data", "_on_batch", "_size", "_tail")

    def __init__(self, on_event: EventSink | None = None, *, on_batch: BatchSink | None = None) -> None:
        if on_batch is None:
            if on_event is None:
                raise TypeError("SseParser needs on_event or on_batch")
            sink = on_event

            def each(events: list[bytes], t: float) -> None:
                for e in events:
                    sink(e, t)

            on_batch = each
        self._on_batch = on_batch
        self._tail = b""
        self._data: list[bytes] = []
        self._size = 0

    def feed(self, chunk: bytes, t: float) -> None:
        data = self._tail + chunk if self._tail else chunk
        if self._data or b"\r" in data:
            self._feed_lines(data, t)
            return
        # fast path (LF line ends, at an event boundary): split into events, and an event that is
        # one "data: " line needs no further work
        events = data.split(b"\n\n")
        self._tail = events.pop()
        if len(self._tail) > MAX_EVENT_BYTES:
            raise ProtocolError(f"event stream: event larger than {MAX_EVENT_BYTES >> 20} MiB")
        out: list[bytes] = []
        for ev in events:
            if ev[:6] == b"data: " and b"\n" not in ev:
                out.append(ev[6:])
            elif ev:
                out += self._lines([*ev.split(b"\n"), b""])
        if out:
            self._on_batch(out, t)

    def _feed_lines(self, data: bytes, t: float) -> None:
        lines = data.split(b"\n")
        self._tail = lines.pop()
        if len(self._tail) > MAX_EVENT_BYTES:
            raise ProtocolError(f"event stream: line longer than {MAX_EVENT_BYTES >> 20} MiB")
        out = self._lines(lines)
        if out:
            self._on_batch(out, t)

    def _lines(self, lines: list[bytes]) -> list[bytes]:
        """The events these lines complete (the lines of an unfinished one are kept)."""
        out: list[bytes] = []
        for line in lines:
            if line[-1:] == b"\r":
                line = line[:-1]
            if not line:
                if self._data:
                    payload = self._data[0] if len(self._data) == 1 else b"\n".join(self._data)
                    self._data = []
                    self._size = 0
                    out.append(payload)
            elif line[:5] == b"data:":
                value = line[5:]
                if value[:1] == b" ":
                    value = value[1:]
                self._size += len(value)
                if self._size > MAX_EVENT_BYTES:
                    raise ProtocolError(f"event stream: event larger than {MAX_EVENT_BYTES >> 20} MiB")
                self._data.append(value)
            elif line == b"data":
                self._data.append(b"")
        return out

    def finish(self) -> None:
        """The body ended: an event without its blank line is incomplete (and dropped by SSE)."""
        if self._tail.strip() or self._data:
            raise ProtocolError("event stream ended inside an event")
