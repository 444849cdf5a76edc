#!/usr/bin/env python3
"""How many streamed tokens/s can verify's client consume on one core?

A local server (its own process, pinned to one core) answers ``POST /v1/completions`` with an
OpenAI/vLLM-shaped SSE stream as fast as it can: one token per event, each event its own HTTP
chunk (as vLLM sends them), a ``usage`` event and ``data: [DONE]`` at the end. The client
(this process, pinned to another core) runs the fixed streaming load against it and the script
prints the tokens/s it consumed: the ceiling above which verify itself, not the server, would
be what is measured.

    .venv/bin/python bench/client_ceiling.py --client verify

Clients are a registry (``CLIENTS``): add ``vllm`` (``vllm bench serve`` against the same server)
or another peer there; each takes the server URL and the load, and returns a :class:`ClientRun`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

from llmfleet.verify.httpclient import Connection, Endpoint, Timeouts
from llmfleet.verify.runner import run_load

MODEL = "bench-model"


# -- the server -----------------------------------------------------------------------------------


def _frame(payload: bytes) -> bytes:
    """One SSE event as one HTTP chunk."""
    event = b"data: " + payload + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(event), event)


def _token_frame(i: int) -> bytes:
    obj = {
        "id": "cmpl-bench",
        "object": "text_completion",
        "created": 1700000000,
        "model": MODEL,
        "choices": [{"index": 0, "text": f" t{i % 1000}", "logprobs": None, "finish_reason": None, "stop_reason": None}],
        "usage": None,
    }
    return _frame(json.dumps(obj).encode())


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, frames: list[bytes], per_write: int) -> None:
    try:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            body = json.loads(await reader.readexactly(length)) if length else {}
            n = int(body.get("max_tokens", 16))
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\ntransfer-encoding: chunked\r\n\r\n")
            batch: list[bytes] = []
            for i in range(n):
                batch.append(frames[i % len(frames)])
                if len(batch) >= per_write:
                    writer.write(b"".join(batch))
                    batch.clear()
                    if writer.transport.get_write_buffer_size() > 1 << 20:
                        await writer.drain()
            usage = {"prompt_tokens": 8, "completion_tokens": n, "total_tokens": n + 8}
            last = {"id": "cmpl-bench", "object": "text_completion", "created": 1700000000, "model": MODEL, "choices": [], "usage": usage}
            batch += [_frame(json.dumps(last).encode()), _frame(b"[DONE]"), b"0\r\n\r\n"]
            writer.write(b"".join(batch))
            await writer.drain()
    finally:
        writer.transport.abort()


async def _serve(port: int, per_write: int) -> None:
    frames = [_token_frame(i) for i in range(1000)]
    server = await asyncio.start_server(lambda r, w: _handle(r, w, frames, per_write), "127.0.0.1", port)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


# -- the clients ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientRun:
    tokens: int  # output tokens the client counted (from usage)
    seconds: float  # wall time of the load
    requests_ok: int
    cpu_seconds: float  # CPU time this process spent in the load (user + system)


Client = Callable[[str, int, int, int], Coroutine[Any, Any, ClientRun]]


async def run_verify(url: str, concurrency: int, requests: int, output_tokens: int) -> ClientRun:
    """llmfleet.verify's own client: the same code path as ``verify``'s load phase."""
    ep = Endpoint.parse(url)
    conns = [Connection(ep, Timeouts(connect=5, first_byte=30, idle=30)) for _ in range(concurrency)]
    prompts = ["bench"] * requests
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    results, seconds = await run_load(conns, MODEL, prompts, output_tokens)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    for c in conns:
        c.close()
    ok = [r for r in results if r is not None and r.error is None]
    errors = {r.error for r in results if r is not None and r.error is not None}
    if errors:
        raise SystemExit(f"client_ceiling: verify client saw errors: {sorted(errors)[:3]}")
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return ClientRun(sum(r.output_tokens or 0 for r in ok), seconds, len(ok), cpu)


#: name → client; the hook for peers (e.g. "vllm": run `vllm bench serve --backend openai` on the same URL)
CLIENTS: dict[str, Client] = {"verify": run_verify}


# -- main -----------------------------------------------------------------------------------------


def _siblings(cpu: int) -> set[int]:
    """Logical CPUs that share a physical core with ``cpu`` (Linux sysfs; empty if unknown)."""
    path = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
    try:
        text = path.read_text().strip()
    except OSError:
        return set()
    out: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out - {cpu}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--client", choices=sorted(CLIENTS), default="verify")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--output-tokens", type=int, default=4096)
    p.add_argument("--events-per-write", type=int, default=1, help="server: SSE events per socket write (1: like vLLM)")
    p.add_argument("--client-cpu", type=int, default=0)
    p.add_argument("--server-cpu", type=int, default=1)
    p.add_argument("--repeat", type=int, default=5, help="runs; the median is reported")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.serve:
        os.sched_setaffinity(0, {args.server_cpu})
        asyncio.run(_serve(args.port, args.events_per_write))
        return 0

    cpus = os.sched_getaffinity(0)
    if args.client_cpu == args.server_cpu or not {args.client_cpu, args.server_cpu} <= cpus:
        p.error(f"--client-cpu and --server-cpu must be two different cores of {sorted(cpus)}")
    if args.server_cpu in _siblings(args.client_cpu):
        print(f"note: cpus {args.client_cpu} and {args.server_cpu} are SMT siblings (one physical core): pick others", file=sys.stderr)
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", "--server-cpu", str(args.server_cpu), "--events-per-write", str(args.events_per_write)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        os.sched_setaffinity(0, {args.client_cpu})
        client = CLIENTS[args.client]
        url = f"http://127.0.0.1:{port}"
        asyncio.run(client(url, args.concurrency, min(args.requests, args.concurrency), 256))  # warm-up
        runs: list[ClientRun] = [asyncio.run(client(url, args.concurrency, args.requests, args.output_tokens)) for _ in range(args.repeat)]
    finally:
        server.terminate()
        server.wait(10)
    rates = sorted(r.tokens / r.seconds for r in runs)
    median = statistics.median(rates)
    print(
        f"client={args.client} python={sys.version.split()[0]} client_cpu={args.client_cpu} server_cpu={args.server_cpu} "
        f"concurrency={args.concurrency} requests={args.requests} output_tokens={args.output_tokens} "
        f"events_per_write={args.events_per_write}"
    )
    for r in runs:
        rate = r.tokens / r.seconds
        print(f"  run: {r.tokens} tokens in {r.seconds:.3f} s = {rate:,.0f} tokens/s, client CPU {r.cpu_seconds / r.seconds:.0%}")
    print(f"ceiling: {median:,.0f} streamed tokens/s on one core, median of {len(runs)} (best {rates[-1]:,.0f}); one token per SSE event")
    return 0


if __name__ == "__main__":
    sys.exit(main())
