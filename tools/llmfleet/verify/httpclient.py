"""A small HTTP/1.1 client on asyncio streams: exactly what verify needs, stdlib only.

One :class:`Connection` is one keep-alive TCP (or TLS) connection used by one task at a time.
Bodies may be framed by Content-Length, by chunked transfer-coding or by the end of the
connection. A 200 response can be handed to a *sink* piece by piece as it arrives (for
``text/event-stream``), each piece with the :func:`time.perf_counter` time of the read that
brought it; every other response is buffered.

Every wait is bounded (:class:`Timeouts`):

* ``connect``    opening the TCP/TLS connection;
* ``first_byte`` request written → first byte of the response *body* (covers queueing and
  prefill: vLLM sends streaming headers at once and the first event after prefill);
* ``idle``       silence between two reads of the body once it has started;
* ``total``      cap on one whole request: a server that sends a byte just inside ``idle`` still
  ends there. When not given it is ``first_byte + 5 × idle`` (600 s with the defaults).

Memory is bounded too: a body that goes to a sink is not kept; a buffered 2xx body is refused past
``MAX_BUFFERED_BODY``; an error body keeps its first ``MAX_ERROR_BODY`` bytes (enough for the
message) and the rest is not read (the connection is dropped), so ``concurrency`` failing requests
hold at most ``concurrency × MAX_ERROR_BODY``.

A failure raises :class:`HttpError` (or a subclass) whose ``str()`` is a one-line reason; the
connection is then dropped and the next request opens a fresh one.
"""

from __future__ import annotations

import asyncio
import math
import re
import socket
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

USER_AGENT = "llmfleet-verify/1"
READ_SIZE = 1 << 16
MAX_HEAD_BYTES = 1 << 16
MAX_BUFFERED_BODY = 64 << 20
#: bytes of an error response's body kept (its message); the rest is not read
MAX_ERROR_BODY = 64 << 10
MAX_CHUNK_LINE = 4096
#: without an explicit total, a request may take its first-byte wait and this many idle gaps
IDLE_GAPS_PER_REQUEST = 5

#: a sink receives decoded body bytes and the perf_counter time of the read that brought them
BodySink = Callable[[bytes, float], None]


def seconds(x: float) -> str:
    """A duration for a message: 0.5 → "0.5", 0.999998 → "1", 300.0 → "300"."""
    return f"{x:.3f}".rstrip("0").rstrip(".")


class HttpError(Exception):
    """A request did not complete. ``str()`` is a one-line reason."""


class HttpTimeout(HttpError):
    """A connect, first-byte, idle or total timeout passed."""


class ProtocolError(HttpError):
    """The peer sent something that is not valid HTTP/1.1 (or not the stream we expect)."""


class _StaleConnection(Exception):
    """A reused keep-alive connection was closed by the server before it answered."""


class _BodyCut(Exception):
    """An error body reached MAX_ERROR_BODY: keep what was read, drop the connection."""


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float = 10.0
    first_byte: float = 300.0
    idle: float = 60.0
    total: float | None = None

    @property
    def request_total(self) -> float:
        """The deadline of one whole request: ``total``, else ``first_byte + 5 × idle``."""
        return self.total if self.total is not None else self.first_byte + IDLE_GAPS_PER_REQUEST * self.idle


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where a server listens: ``http(s)://host:port[/base/path]``."""

    scheme: str
    host: str
    port: int
    base_path: str

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise ValueError(f"invalid URL {url!r}: {exc}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"invalid URL {url!r}: expected http://host:port or https://host:port")
        if parts.query or parts.fragment or parts.username or parts.password:
            raise ValueError(f"invalid URL {url!r}: no query, fragment or credentials allowed")
        if port is None:
            port = 443 if parts.scheme == "https" else 80
        return cls(parts.scheme, parts.hostname, port, parts.path.rstrip("/"))

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.scheme}://{self.authority}{self.base_path}"


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    reason: str
    headers: Mapping[str, str]  # lower-case names; repeated headers joined with ", "
    body: bytes  # empty when the body went to a sink

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "").split(";", 1)[0].strip().lower()


_CHUNK_SIZE_RE = re.compile(rb"([0-9A-Fa-f]{1,15})[ \t]*(?:;[^\r\n]*)?\r?\n")


class ChunkedDecoder:
    """Incremental decoder of the chunked transfer-coding (RFC 9112 §7.1).

    ``feed()`` returns the payload bytes decoded so far (possibly partial chunks, so a slow
    chunk is seen as it arrives); ``done`` turns true after the last chunk and the trailer.
    Works on one ``bytes`` with an index: a read holding hundreds of small chunks (a fast SSE
    stream) costs a regex match and a slice per chunk.
    """

    _SIZE, _DATA, _DATA_END, _TRAILER, _DONE = range(5)

    __slots__ = ("_buf", "_remaining", "_state")

    def __init__(self) -> None:
        self._buf = b""
        self._state = self._SIZE
        self._remaining = 0

    @property
    def done(self) -> bool:
        return self._state == self._DONE

    @property
    def leftover(self) -> bytes:
        """Bytes received after the end of the message (a protocol error for us)."""
        return self._buf if self.done else b""

    def feed(self, data: bytes) -> bytes:
        if self._buf:
            data = self._buf + data
        SIZE, DATA, DATA_END, TRAILER = self._SIZE, self._DATA, self._DATA_END, self._TRAILER
        n = len(data)
        pos = 0
        out: list[bytes] = []
        state = self._state
        remaining = self._remaining
        size_match = _CHUNK_SIZE_RE.match
        while pos < n:
            if state == SIZE:
                m = size_match(data, pos)
                if m is None:
                    if data.find(b"\n", pos) >= 0 or n - pos > MAX_CHUNK_LINE:
                        raise ProtocolError(f"chunked body: invalid chunk-size line {data[pos : pos + 40]!r}")
                    break  # the line is not complete yet
                size = int(m.group(1), 16)
                pos = m.end()
                if not size:
                    state = TRAILER
                    continue
                end = pos + size
                if end + 2 <= n and data[end] == 13 and data[end + 1] == 10:  # the whole chunk is here
                    out.append(data[pos:end])
                    pos = end + 2
                    continue
                remaining = size
                state = DATA
            elif state == DATA:
                take = min(remaining, n - pos)
                out.append(data[pos : pos + take])
                pos += take
                remaining -= take
                if not remaining:
                    state = DATA_END
            elif state == DATA_END:
                if data.startswith(b"\r\n", pos):
                    pos += 2
                elif data.startswith(b"\n", pos):
                    pos += 1
                elif n - pos == 1 and data[pos] == 13:  # a lone CR: wait for its LF
                    break
                else:
                    raise ProtocolError("chunked body: chunk longer than its declared size")
                state = SIZE
            elif state == TRAILER:
                i = data.find(b"\n", pos)
                if i < 0:
                    if n - pos > MAX_HEAD_BYTES:
                        raise ProtocolError("chunked body: trailer too long")
                    break
                line = data[pos:i]
                pos = i + 1
                if line in (b"", b"\r"):
                    state = self._DONE
            else:  # done: the rest is leftover
                break
        self._state = state
        self._remaining = remaining
        self._buf = data[pos:] if pos < n else b""
        if not out:
            return b""
        return out[0] if len(out) == 1 else b"".join(out)


class _Watchdog:
    """Moves one deadline cheaply: a read only stores a time; the timer re-arms itself lazily.

    When the deadline passes it expires the enclosing :func:`asyncio.timeout`, so cancellation
    is asyncio's own (correct with nested cancellation and ``uncancel``).
    """

    __slots__ = ("_cm", "_handle", "_loop", "_when", "fired", "limit", "mark", "phase")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._cm: asyncio.Timeout | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._when = math.inf
        self.phase = ""
        self.limit = 0.0
        self.mark = 0.0
        self.fired = False

    def attach(self, cm: asyncio.Timeout) -> None:
        self._cm = cm

    def arm(self, phase: str, limit: float) -> None:
        self.phase = phase
        self.limit = limit
        self.mark = self._loop.time()
        deadline = self.mark + limit
        if deadline < self._when:
            if self._handle is not None:
                self._handle.cancel()
            self._when = deadline
            self._handle = self._loop.call_at(deadline, self._check)

    def touch(self) -> None:
        """Data arrived: the current phase's limit counts from now."""
        self.mark = self._loop.time()

    def _check(self) -> None:
        self._handle = None
        deadline = self.mark + self.limit
        now = self._loop.time()
        if now >= deadline - 1e-3:  # the loop may run a timer up to its clock resolution early
            self.fired = True
            self._when = math.inf
            if self._cm is not None:
                self._cm.reschedule(now)
        else:
            self._when = deadline
            self._handle = self._loop.call_at(deadline, self._check)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._when = math.inf


def _parse_head(raw: bytes) -> tuple[str, int, str, dict[str, str]]:
    lines = raw.decode("latin-1").split("\r\n")
    status_line = lines[0]
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
        raise ProtocolError(f"not an HTTP/1.x response: {status_line[:60]!r}")
    try:
        status = int(parts[1])
    except ValueError:
        raise ProtocolError(f"invalid status line {status_line[:60]!r}") from None
    if not 100 <= status <= 599:
        raise ProtocolError(f"invalid status code {status}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise ProtocolError(f"invalid header line {line[:60]!r}")
        key = name.lower()
        value = value.strip()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return parts[0], status, parts[2] if len(parts) > 2 else "", headers


class Connection:
    """One keep-alive HTTP/1.1 connection to ``endpoint``; not for concurrent use."""

    def __init__(
        self,
        endpoint: Endpoint,
        timeouts: Timeouts,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.timeouts = timeouts
        extra = dict(headers or {})
        for name, value in extra.items():
            if any(c in name + value for c in "\r\n\0") or ":" in name:
                raise ValueError(f"invalid HTTP header {name!r}")
        lines = [f"Host: {endpoint.authority}", f"User-Agent: {USER_AGENT}", "Accept: */*"]
        lines += [f"{k}: {v}" for k, v in extra.items()]
        self._fixed_headers = ("\r\n".join(lines) + "\r\n").encode("latin-1")
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._ssl: ssl.SSLContext | None = ssl.create_default_context() if endpoint.scheme == "https" else None

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Drop the connection now (abort: never waits on the peer)."""
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.transport.abort()

    async def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        *,
        content_type: str = "application/json",
        sink: BodySink | None = None,
    ) -> Response:
        """Send one request and read its response; see the module docstring for timeouts."""
        if self._reader is not None and self._reader.at_eof():
            self.close()
        reused = self._writer is not None
        try:
            return await self._request_once(method, path, body, content_type, sink, reused)
        except _StaleConnection:
            # The server closed an idle keep-alive connection (uvicorn does after 5 s) while we
            # sent: it read nothing, so sending again on a new connection is safe.
            return await self._request_once(method, path, body, content_type, sink, False)

    async def _request_once(
        self, method: str, path: str, body: bytes | None, content_type: str, sink: BodySink | None, reused: bool
    ) -> Response:
        loop = asyncio.get_running_loop()
        wd = _Watchdog(loop)
        what = f"{method} {path}"
        try:
            async with asyncio.timeout(self.timeouts.request_total) as cm:
                wd.attach(cm)
                return await self._exchange(wd, method, path, body, content_type, sink, reused)
        except _StaleConnection:
            self.close()
            raise
        except TimeoutError as exc:
            self.close()
            if wd.fired:
                limit = seconds(wd.limit)
                if wd.phase == "connect":
                    raise HttpTimeout(f"connecting to {self.endpoint.authority} timed out after {limit} s") from None
                if wd.phase == "first_byte":
                    raise HttpTimeout(f"{what}: no response within {limit} s") from None
                raise HttpTimeout(f"{what}: response stalled, no data for {limit} s") from None
            if cm.expired():
                raise HttpTimeout(f"{what}: not complete within {seconds(self.timeouts.request_total)} s") from None
            raise HttpError(f"{what}: {exc.strerror or 'timed out'}") from None
        except HttpError:
            self.close()
            raise
        except asyncio.IncompleteReadError:
            self.close()
            raise ProtocolError(f"{what}: connection closed before the response was complete") from None
        except asyncio.LimitOverrunError:
            self.close()
            raise ProtocolError(f"{what}: response header too large") from None
        except OSError as exc:
            self.close()
            raise HttpError(f"{what}: {exc.strerror or exc.__class__.__name__}") from None
        except BaseException:
            self.close()
            raise
        finally:
            wd.close()

    async def _connect(self, wd: _Watchdog) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        ep = self.endpoint
        wd.arm("connect", self.timeouts.connect)
        try:
            reader, writer = await asyncio.open_connection(
                ep.host, ep.port, ssl=self._ssl, limit=MAX_HEAD_BYTES, server_hostname=ep.host if self._ssl else None
            )
        except ConnectionRefusedError:
            raise HttpError(f"connection refused by {ep.authority}") from None
        except socket.gaierror as exc:
            raise HttpError(f"cannot resolve {ep.host}: {exc.strerror}") from None
        except ssl.SSLError as exc:
            raise HttpError(f"TLS with {ep.authority} failed: {exc.reason or exc}") from None
        except OSError as exc:
            if isinstance(exc, TimeoutError) and wd.fired:
                raise
            raise HttpError(f"cannot connect to {ep.authority}: {exc.strerror or exc}") from None
        sock: Any = writer.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._reader, self._writer = reader, writer
        return reader, writer

    async def _exchange(
        self,
        wd: _Watchdog,
        method: str,
        path: str,
        body: bytes | None,
        content_type: str,
        sink: BodySink | None,
        reused: bool,
    ) -> Response:
        if self._reader is None or self._writer is None:
            reader, writer = await self._connect(wd)
        else:
            reader, writer = self._reader, self._writer
        target = self.endpoint.base_path + path
        head = f"{method} {target} HTTP/1.1\r\n".encode("latin-1") + self._fixed_headers
        if body is not None:
            head += f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n".encode("latin-1")
        head += b"\r\n"
        wd.arm("first_byte", self.timeouts.first_byte)
        try:
            writer.write(head + body if body else head)
            await writer.drain()
            raw = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionResetError, BrokenPipeError) as exc:
            if reused and not (isinstance(exc, asyncio.IncompleteReadError) and exc.partial):
                raise _StaleConnection from None
            raise
        version, status, reason, headers = _parse_head(raw)
        while 100 <= status < 200:  # interim responses (we never send Expect, but be tolerant)
            raw = await reader.readuntil(b"\r\n\r\n")
            version, status, reason, headers = _parse_head(raw)

        chunks: list[bytes] = []
        buffered = 0

        def buffer(data: bytes, t: float) -> None:
            nonlocal buffered
            buffered += len(data)
            if buffered > MAX_BUFFERED_BODY:
                raise ProtocolError(f"{method} {path}: response body larger than {MAX_BUFFERED_BODY} bytes")
            chunks.append(data)

        def buffer_error(data: bytes, t: float) -> None:
            nonlocal buffered
            room = MAX_ERROR_BODY - buffered
            chunks.append(data[:room])
            buffered += min(len(data), room)
            if len(data) > room:
                raise _BodyCut

        if sink is not None and status == 200:
            deliver: BodySink = sink
        else:
            deliver = buffer if 200 <= status < 300 else buffer_error
        try:
            return await self._read_body(wd, reader, method, path, status, reason, headers, version, deliver, chunks)
        except _BodyCut:
            self.close()  # the rest of an error body is never read
            return Response(status, reason, headers, b"".join(chunks))

    async def _read_body(
        self,
        wd: _Watchdog,
        reader: asyncio.StreamReader,
        method: str,
        path: str,
        status: int,
        reason: str,
        headers: dict[str, str],
        version: str,
        deliver: BodySink,
        chunks: list[bytes],
    ) -> Response:
        conn_tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
        keep_alive = version == "HTTP/1.1" and "close" not in conn_tokens
        te = headers.get("transfer-encoding")
        cl = headers.get("content-length")
        started = False
        idle = self.timeouts.idle
        perf = time.perf_counter
        if method == "HEAD" or status in (204, 304):
            pass
        elif te is not None:
            if te.split(",")[-1].strip().lower() != "chunked":
                raise ProtocolError(f"{method} {path}: unsupported transfer-encoding {te!r}")
            decoder = ChunkedDecoder()
            while not decoder.done:
                data = await reader.read(READ_SIZE)
                if not data:
                    raise ProtocolError(f"{method} {path}: connection closed mid-body (chunked stream cut)")
                t = perf()
                if started:
                    wd.touch()
                else:
                    started = True
                    wd.arm("idle", idle)
                payload = decoder.feed(data)
                if payload:
                    deliver(payload, t)
            if decoder.leftover:
                keep_alive = False
        elif cl is not None:
            try:
                remaining = int(cl)
                if remaining < 0:
                    raise ValueError
            except ValueError:
                raise ProtocolError(f"{method} {path}: invalid Content-Length {cl!r}") from None
            total = remaining
            while remaining:
                data = await reader.read(min(remaining, READ_SIZE))
                if not data:
                    raise ProtocolError(f"{method} {path}: connection closed mid-body ({total - remaining} of {total} bytes)")
                t = perf()
                if started:
                    wd.touch()
                else:
                    started = True
                    wd.arm("idle", idle)
                remaining -= len(data)
                deliver(data, t)
        else:
            keep_alive = False
            while True:
                data = await reader.read(READ_SIZE)
                if not data:
                    break
                t = perf()
                if started:
                    wd.touch()
                else:
                    started = True
                    wd.arm("idle", idle)
                deliver(data, t)
        if not keep_alive:
            self.close()
        return Response(status, reason, headers, b"".join(chunks))
