#!/usr/bin/env python3
"""The client's ceiling: how many streamed tokens/s verify.py and ``vllm bench serve`` consume on one core.

A local server (its own process, pinned to one core) speaks just enough of vLLM's API
(``/health``, ``/v1/models``, ``/tokenize``, ``/metrics``, streaming ``/v1/completions``) and
streams as fast as it can: one token per SSE event, each event its own HTTP chunk (as vLLM sends
them; ``--events-per-write`` of them per socket write, so that the server is not the limit), a
``usage`` event and ``data: [DONE]`` at the end. Each client runs, pinned to another core, the
same load (``--concurrency`` streams, ``--requests`` requests of ``--output-tokens`` tokens,
``ignore_eos``), through its own command line:

* ``tools/verify.py --url … --no-ladder --no-history`` (the runtime's Python 3.11 by default, as on
  the hosts: verify is stdlib-only);
* ``python -m vllm.entrypoints.cli.main bench serve --backend openai --endpoint /v1/completions
  --dataset-name random …`` from the pinned CPU runtime (tokenizer: the tiny model).

For each run it prints the client's own output tokens/s, and, from the server's side, the busy
period (first request in → last response out), the client's CPU time over that period (sampled
from ``/proc``) and the tokens per CPU second. A client near 100 % CPU is at its ceiling; below
that, the server (or the machine) was the limit and the figure is a floor.

    .venv/bin/python bench/client_ceiling.py                 # both clients, 2 runs each
    .venv/bin/python bench/client_ceiling.py --clients verify --repeat 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers
from peers import Figures, Workload

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
    }
    return _frame(json.dumps(obj).encode())


class FastServer:
    """Streams as fast as it can; prints ``req <t0> <t1> <tokens>`` (monotonic seconds) per streamed request."""

    def __init__(self, per_write: int) -> None:
        self.frames = [_token_frame(i) for i in range(1000)]
        self.per_write = per_write

    @staticmethod
    def _json(writer: asyncio.StreamWriter, obj: object, status: str = "200 OK") -> None:
        body = json.dumps(obj).encode()
        writer.write(b"HTTP/1.1 %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (status.encode(), len(body), body))

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                method, path, _ = head.split(b"\r\n", 1)[0].decode().split(" ", 2)
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = json.loads(await reader.readexactly(length)) if length else {}
                path = path.split("?", 1)[0]
                if path == "/health":
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                elif path == "/version":
                    self._json(writer, {"version": "bench"})
                elif path == "/v1/models":
                    entry = {"id": MODEL, "object": "model", "root": "/bench", "max_model_len": 1 << 20}
                    self._json(writer, {"object": "list", "data": [entry]})
                elif path == "/tokenize":
                    self._json(writer, {"count": len(str(body.get("prompt", "")).split()) + 1, "max_model_len": 1 << 20})
                elif path == "/metrics":
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 0\r\n\r\n")
                elif path == "/v1/completions" and method == "POST" and body.get("stream"):
                    await self.stream(writer, int(body.get("max_tokens", 16)))
                else:
                    self._json(writer, {"error": {"message": f"not here: {method} {path}", "code": 404}}, "404 Not Found")
                await writer.drain()
        finally:
            writer.transport.abort()

    async def stream(self, writer: asyncio.StreamWriter, n: int) -> None:
        t0 = time.monotonic()
        try:
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\ntransfer-encoding: chunked\r\n\r\n")
            batch: list[bytes] = []
            frames = self.frames
            for i in range(n):
                batch.append(frames[i % 1000])
                if len(batch) >= self.per_write:
                    writer.write(b"".join(batch))
                    batch.clear()
                    if writer.transport.get_write_buffer_size() > 1 << 18:
                        await writer.drain()
            usage = {"prompt_tokens": 8, "completion_tokens": n, "total_tokens": n + 8}
            last = {"id": "cmpl-bench", "object": "text_completion", "created": 1700000000, "model": MODEL, "choices": [], "usage": usage}
            batch += [_frame(json.dumps(last).encode()), _frame(b"[DONE]"), b"0\r\n\r\n"]
            writer.write(b"".join(batch))
            await writer.drain()
        finally:
            print(f"req {t0} {time.monotonic()} {n}", flush=True)


async def _serve(per_write: int) -> None:
    server_obj = FastServer(per_write)
    server = await asyncio.start_server(server_obj.handle, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


# -- the harness ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    figures: Figures
    busy_s: float  # the server's view: first request in → last response out
    busy_tokens: int
    client_cpu_s: float  # over the busy period
    server_cpu_s: float

    @property
    def server_share(self) -> float:
        return self.server_cpu_s / self.busy_s if self.busy_s > 0 else 0.0

    @property
    def cpu_share(self) -> float:
        return self.client_cpu_s / self.busy_s if self.busy_s > 0 else 0.0

    @property
    def tokens_per_cpu_s(self) -> float:
        return self.busy_tokens / self.client_cpu_s if self.client_cpu_s > 0 else float("inf")


class Server:
    def __init__(self, cpu: int, per_write: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve", "--events-per-write", str(per_write)],
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=peers.on_cpus({cpu}),
        )
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())
        self.busy: queue.Queue[tuple[float, float, int]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            parts = line.split()
            if parts and parts[0] == "req":
                self.busy.put((float(parts[1]), float(parts[2]), int(parts[3])))

    def periods(self) -> list[tuple[float, float, int]]:
        out = []
        while True:
            try:
                out.append(self.busy.get_nowait())
            except queue.Empty:
                return out

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def measure(name: str, cmd: list[str], env: dict[str, str] | None, server: Server, cpu: int, result: Path, is_vllm: bool, n: int) -> Run:
    server.periods()  # drop earlier ones
    server_cpu = peers.CpuSampler(server.proc.pid)
    rc, tail, sampler = peers.run_pinned(cmd, cpu, env)
    server_cpu.stop()
    time.sleep(0.2)
    periods = server.periods()
    if rc not in (0, 2) or not result.exists():  # 2: verify measured but judged (a warning-free run exits 0)
        raise SystemExit(f"bench: {name} failed (exit {rc}):\n{tail}")
    fig = peers.vllm_figures(result) if is_vllm else peers.verify_figures(result)
    if fig.failed:
        raise SystemExit(f"bench: {name}: {fig.failed} requests failed:\n{tail}")
    if len(periods) < n:
        raise SystemExit(f"bench: {name}: the server saw {len(periods)} streamed requests, expected {n}")
    load = periods[-n:]  # the load's requests are the last n (vllm's one-request test comes before them)
    t0, t1 = min(p[0] for p in load), max(p[1] for p in load)
    tokens = sum(p[2] for p in load)
    return Run(fig, t1 - t0, tokens, sampler.at(t1) - sampler.at(t0), server_cpu.at(t1) - server_cpu.at(t0))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--clients", default="verify,vllm", help="comma list of verify, vllm (default both)")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--output-tokens", type=int, default=4096)
    p.add_argument("--events-per-write", type=int, default=16, help="server: SSE events (HTTP chunks) per socket write")
    p.add_argument("--client-cpu", type=int, default=0)
    p.add_argument("--server-cpu", type=int, default=1)
    p.add_argument("--repeat", type=int, default=2, help="runs per client; the median is reported")
    p.add_argument("--verify-python", help="interpreter for verify.py (default: the runtime's, Python 3.11)")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.serve:
        asyncio.run(_serve(args.events_per_write))
        return 0

    clients = [c.strip() for c in args.clients.split(",") if c.strip()]
    if not set(clients) <= {"verify", "vllm"}:
        p.error("--clients takes verify and/or vllm")
    cpus = os.sched_getaffinity(0)
    if args.client_cpu == args.server_cpu or not {args.client_cpu, args.server_cpu} <= cpus:
        p.error(f"--client-cpu and --server-cpu must be two different cores of {sorted(cpus)}")
    rt_python = peers.runtime_python()
    verify_python = args.verify_python or rt_python
    w = Workload(args.concurrency, args.requests, 8, args.output_tokens)
    tmp = Path(tempfile.mkdtemp(prefix="llmfleet-ceiling-"))
    shim = peers.vllm_shim()
    server = Server(args.server_cpu, args.events_per_write)
    url = f"http://127.0.0.1:{server.port}"
    runs: dict[str, list[Run]] = {c: [] for c in clients}
    try:
        for i in range(args.repeat):
            for c in clients:
                out = tmp / f"{c}-{i}.json"
                if c == "verify":
                    cmd, env = peers.verify_cmd(verify_python, url, w, out), None
                else:
                    cmd, env = peers.vllm_cmd(rt_python, url, MODEL, peers.model_dir(), w, tmp, out.name), peers.vllm_env(shim)
                r = measure(c, cmd, env, server, args.client_cpu, out, c == "vllm", w.requests)
                runs[c].append(r)
                print(
                    f"  {c:7} run {i + 1}: {r.figures.output_tokens_per_s:>9,.0f} tokens/s reported; server busy {r.busy_s:.2f} s "
                    f"for {r.busy_tokens} tokens; client CPU {r.cpu_share:.0%} → {r.tokens_per_cpu_s:,.0f} tokens per CPU second; "
                    f"server CPU {r.server_share:.0%}",
                    flush=True,
                )
    finally:
        server.stop()
        shutil.rmtree(shim, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)

    version = subprocess.run([str(verify_python), "-V"], capture_output=True, text=True).stdout.strip()
    print(
        f"\nclient ceiling · {w.requests} requests × {w.output_tokens} tokens, concurrency {w.concurrency}, one token per SSE event "
        f"({args.events_per_write} events per server write) · client on cpu {args.client_cpu}, server on cpu {args.server_cpu} · "
        f"verify on {version}"
    )
    med: dict[str, tuple[float, float, float]] = {}
    for c, rs in runs.items():
        rate = statistics.median(r.figures.output_tokens_per_s for r in rs)
        per_cpu = statistics.median(r.tokens_per_cpu_s for r in rs)
        share = statistics.median(r.cpu_share for r in rs)
        med[c] = (rate, per_cpu, share)
        label = "verify.py" if c == "verify" else "vllm bench serve"
        print(f"  {label:17} {rate:>9,.0f} tokens/s (median of {len(rs)}), client CPU {share:.0%}, {per_cpu:>9,.0f} tokens per CPU second")
    if {"verify", "vllm"} <= med.keys():
        v, b = med["verify"], med["vllm"]
        ok = "meets" if v[0] >= 1.5 * b[0] else "MISSES"
        print(f"  ratio verify ÷ vllm bench serve: {v[0] / b[0]:.2f}× tokens/s ({ok} the 1.5× target), {v[1] / b[1]:.2f}× per CPU second")
    return 0


if __name__ == "__main__":
    sys.exit(main())
