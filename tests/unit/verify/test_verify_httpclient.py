"""The stdlib HTTP/1.1 client, its chunked decoder and the SSE parser, against raw asyncio servers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest
from llmfleet.verify.httpclient import (
    ChunkedDecoder,
    Connection,
    Endpoint,
    HttpError,
    HttpTimeout,
    ProtocolError,
    Timeouts,
)
from llmfleet.verify.sse import SseParser

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
FAST = Timeouts(connect=2, first_byte=2, idle=2)


def chunked(*pieces: bytes, ext: bool = False) -> bytes:
    out = b"".join(b"%x%s\r\n%s\r\n" % (len(p), b";x=1" if ext else b"", p) for p in pieces)
    return out + b"0\r\n\r\n"


# -- chunked decoder ------------------------------------------------------------------------------


@pytest.mark.parametrize("step", [1, 2, 3, 7, 1000])
def test_chunked_decoder_any_split(step: int) -> None:
    pieces = [b"hello ", b"world", b"x" * 300, b"\r\n inside data \r\n"]
    wire = chunked(*pieces, ext=True)[:-2] + b"Trailer-Field: 1\r\n\r\n"
    d = ChunkedDecoder()
    got = b""
    for i in range(0, len(wire), step):
        got += d.feed(wire[i : i + step])
    assert got == b"".join(pieces) and d.done and d.leftover == b""


def test_chunked_decoder_errors_and_leftover() -> None:
    with pytest.raises(ProtocolError, match="invalid chunk-size"):
        ChunkedDecoder().feed(b"zz\r\nab\r\n")
    with pytest.raises(ProtocolError, match="invalid chunk-size"):
        ChunkedDecoder().feed(b"-2\r\nab\r\n")
    with pytest.raises(ProtocolError, match="longer than its declared size"):
        ChunkedDecoder().feed(b"2\r\nabc\r\n")
    d = ChunkedDecoder()
    assert d.feed(b"2\r\nab\r\n0\r\n\r\nEXTRA") == b"ab"
    assert d.done and d.leftover == b"EXTRA"
    partial = ChunkedDecoder()
    assert partial.feed(b"5\r\nab") == b"ab" and not partial.done  # a slow chunk is seen as it arrives
    assert partial.feed(b"cde\r\n") == b"cde"


# -- SSE ------------------------------------------------------------------------------------------


def _events(*feeds: bytes) -> list[bytes]:
    got: list[bytes] = []
    p = SseParser(lambda d, t: got.append(d))
    for f in feeds:
        p.feed(f, 0.0)
    p.finish()
    return got


def test_sse_fast_and_general_forms() -> None:
    wire = b'data: {"a":1}\n\ndata: {"b":2}\n\n: keep-alive comment\n\nevent: x\nid: 7\ndata: multi\ndata:line\n\ndata: [DONE]\n\n'
    want = [b'{"a":1}', b'{"b":2}', b"multi\nline", b"[DONE]"]
    mixed = wire.replace(b"data: multi\n", b"data: multi\r\n")
    for w in (wire, wire.replace(b"\n", b"\r\n"), mixed):
        assert _events(w) == want
        for cut in range(1, len(w)):  # every split point between two reads
            assert _events(w[:cut], w[cut:]) == want, cut
        assert _events(*(w[i : i + 1] for i in range(len(w)))) == want  # byte by byte


def test_sse_incomplete_event_at_end() -> None:
    p = SseParser(lambda d, t: None)
    p.feed(b"data: [DONE]\n", 0.0)
    with pytest.raises(ProtocolError, match="ended inside an event"):
        p.finish()


def test_sse_passes_read_time() -> None:
    times: list[float] = []
    p = SseParser(lambda d, t: times.append(t))
    p.feed(b"data: 1\n\ndata: 2", 1.5)
    p.feed(b"\n\n", 2.5)
    assert times == [1.5, 2.5]


# -- the connection -------------------------------------------------------------------------------


async def _serve(handler: Handler) -> tuple[asyncio.Server, Endpoint, list[int]]:
    accepted: list[int] = []

    async def wrapped(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        accepted.append(1)
        try:
            await handler(r, w)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            w.transport.abort()

    server = await asyncio.start_server(wrapped, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, Endpoint.parse(f"http://127.0.0.1:{port}"), accepted


async def _read_request(r: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await r.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head, await r.readexactly(length)


def run(coro: Awaitable[None]) -> None:
    async def main() -> None:
        await coro

    asyncio.run(main())


def test_keep_alive_content_length_and_chunked() -> None:
    heads: list[bytes] = []

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            head, body = await _read_request(r)
            heads.append(head + body)
            if head.startswith(b"GET /a"):
                w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
            else:
                w.write(b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\nX-Two: 1\r\nx-two: 2\r\n\r\n" + chunked(b"wor", b"ld"))
            await w.drain()

    async def main() -> None:
        server, ep, accepted = await _serve(handler)
        async with server:
            conn = Connection(ep, FAST, {"Authorization": "Bearer k"})
            a = await conn.request("GET", "/a")
            b = await conn.request("POST", "/b", b'{"x": 1}')
            conn.close()
        assert (a.status, a.body) == (200, b"hello")
        assert (b.status, b.reason, b.body, b.headers["x-two"]) == (201, "Created", b"world", "1, 2")
        assert len(accepted) == 1  # one keep-alive connection for both
        assert b"Authorization: Bearer k\r\n" in heads[1] and heads[1].endswith(b'{"x": 1}')
        assert b"Content-Type: application/json\r\nContent-Length: 8\r\n" in heads[1]

    run(main())


def test_stale_keep_alive_is_retried_and_connection_close_honoured() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _read_request(r)
        # no "Connection: close", but the server closes anyway (an idle keep-alive timeout)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await w.drain()
        await asyncio.sleep(0.05)

    async def main() -> None:
        server, ep, accepted = await _serve(handler)
        async with server:
            conn = Connection(ep, FAST)
            for _ in range(3):
                assert (await conn.request("GET", "/")).body == b"ok"
                await asyncio.sleep(0.1)
            conn.close()
        assert len(accepted) == 3

    run(main())


def test_eof_delimited_body() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _read_request(r)
        w.write(b"HTTP/1.0 200 OK\r\n\r\nuntil the end")
        await w.drain()

    async def main() -> None:
        server, ep, _ = await _serve(handler)
        async with server:
            assert (await Connection(ep, FAST).request("GET", "/")).body == b"until the end"

    run(main())


def test_sink_gets_pieces_as_they_arrive() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        for i in range(3):
            w.write(b"%x\r\n%s\r\n" % (len(b"data: %d\n\n" % i), b"data: %d\n\n" % i))
            await w.drain()
            await asyncio.sleep(0.05)
        w.write(b"0\r\n\r\n")
        await w.drain()

    async def main() -> None:
        server, ep, _ = await _serve(handler)
        got: list[tuple[bytes, float]] = []
        async with server:
            resp = await Connection(ep, FAST).request("POST", "/s", b"{}", sink=lambda d, t: got.append((d, t)))
        assert resp.body == b"" and resp.content_type == "text/event-stream"
        assert [d for d, _ in got] == [b"data: 0\n\n", b"data: 1\n\n", b"data: 2\n\n"]
        assert got[2][1] - got[0][1] > 0.08  # timestamps are read times

    run(main())


def test_error_status_is_buffered_not_sunk() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _read_request(r)
        w.write(b'HTTP/1.1 500 Internal Server Error\r\nContent-Length: 11\r\n\r\n{"e": "no"}')
        await w.drain()

    async def main() -> None:
        server, ep, _ = await _serve(handler)
        sunk: list[bytes] = []
        async with server:
            resp = await Connection(ep, FAST).request("POST", "/", b"{}", sink=lambda d, t: sunk.append(d))
        assert resp.status == 500 and resp.body == b'{"e": "no"}' and sunk == []

    run(main())


async def _expect(ep: Endpoint, timeouts: Timeouts, exc: type[Exception], fragment: str, within: float) -> None:
    t0 = time.monotonic()
    with pytest.raises(exc) as info:
        await Connection(ep, timeouts).request("GET", "/x")
    assert fragment in str(info.value), str(info.value)
    assert time.monotonic() - t0 < within
    assert "\n" not in str(info.value)


def test_first_byte_timeout() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")  # headers, then nothing
        await r.read()  # until the client gives up

    async def main() -> None:
        server, ep, _ = await _serve(handler)
        async with server:
            await _expect(ep, Timeouts(1, 0.3, 5), HttpTimeout, "GET /x: no response within 0.3 s", 2)

    run(main())


def test_idle_timeout_mid_body() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        await w.drain()
        await r.read()  # until the client gives up

    async def main() -> None:
        server, ep, _ = await _serve(handler)
        async with server:
            await _expect(ep, Timeouts(1, 5, 0.3), HttpTimeout, "response stalled, no data for 0.3 s", 2)

    run(main())


def test_trickle_is_stopped_by_the_total_timeout() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        for _ in range(100):
            w.write(b"x")
            await w.drain()
            await asyncio.sleep(0.05)

    async def main() -> None:
        server, ep, _ = await _serve(handler)
        async with server:
            await _expect(ep, Timeouts(1, 1, 1, total=0.4), HttpTimeout, "not complete within 0.4 s", 2)

    run(main())


@pytest.mark.parametrize(
    ("reply", "fragment"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", "connection closed mid-body (3 of 10 bytes)"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n", "connection closed mid-body (chunked stream cut)"),
        (b"SSH-2.0-OpenSSH\r\n\r\n", "not an HTTP/1.x response"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", "unsupported transfer-encoding"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", "invalid Content-Length"),
        (b"HTTP/1.1 200", "connection closed before the response was complete"),
    ],
)
def test_protocol_errors(reply: bytes, fragment: str) -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _read_request(r)
        w.write(reply)
        await w.drain()

    async def main() -> None:
        server, ep, _ = await _serve(handler)
        async with server:
            await _expect(ep, FAST, HttpError, fragment, 2)

    run(main())


def test_connection_refused() -> None:
    async def main() -> None:
        server, ep, _ = await _serve(lambda r, w: asyncio.sleep(0))
        server.close()
        await server.wait_closed()
        await _expect(ep, FAST, HttpError, f"connection refused by 127.0.0.1:{ep.port}", 2)

    run(main())


def test_endpoint_parse() -> None:
    ep = Endpoint.parse("https://[::1]:8443/prefix/")
    assert (ep.scheme, ep.host, ep.port, ep.base_path, ep.authority) == ("https", "::1", 8443, "/prefix", "[::1]:8443")
    assert Endpoint.parse("http://h").port == 80
    for bad in ("ftp://h:1", "http://", "http://h:99999", "http://u:p@h:1", "http://h:1/?q=1"):
        with pytest.raises(ValueError):
            Endpoint.parse(bad)
