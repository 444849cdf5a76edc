#!/usr/bin/env python3
"""Agreement: the same workload through verify.py and ``vllm bench serve`` against one real CPU vLLM.

Starts one vLLM server (the pinned CPU runtime, the tiny model, 127.0.0.1, a free port) unless
``--url`` names a running one, waits for ``/health``, then runs both clients in turn, ``--rounds``
times, the order swapped every round (verify first, then vllm first, …), with the same workload:
``--concurrency`` streams, ``--requests`` requests of ``--prompt-tokens`` prompt tokens (as the
server counts them, BOS included) and ``--output-tokens`` output tokens with ``ignore_eos``. Prints
each run's output tokens/s and TTFT p50 as each client reports them, the medians and their
difference, against the 5 % agreement target; then stops the server it started.

The clients run on the last CPU alone and the server it starts on the others (``--no-split``: all
share): on a small machine a client that waits for a CPU adds that wait to its own TTFT, and the two
clients are not equally heavy, so the comparison would measure the clients' CPU needs, not the server.

verify runs as its command line (``tools/verify.py --url … --no-ladder --no-history``) each time;
``vllm bench serve`` runs as its own ``main()`` with the command line's arguments, in one process
kept for the whole bench (the CLI subcommand calls exactly that), so that vLLM's 30 s import is paid
once and the two clients alternate within seconds: on a shared machine the load of the moment moves
both figures by tens of percent from one minute to the next.

    .venv/bin/python bench/agreement.py
    .venv/bin/python bench/agreement.py --url http://127.0.0.1:8000 --rounds 3
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers
from peers import Figures, Workload

sys.path.insert(0, str(peers.TOOLS))
from llmfleet.verify import prometheus
from llmfleet.verify.prometheus import Histogram

MODEL = "tiny-llama"
TARGET = 0.05


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def partition(split: bool) -> tuple[set[int] | None, int | None]:
    """The server's CPUs and the client's: the last usable CPU for the client, the rest for the server.

    On a small machine the client and the server otherwise take turns on the same cores and each
    client's TTFT holds its own wait for a CPU, which differs between clients (vLLM's asyncio client
    and verify.py's threads are not equally heavy)."""
    cpus = sorted(os.sched_getaffinity(0))
    if not split or len(cpus) < 2:
        return None, None
    return set(cpus[:-1]), cpus[-1]


def start_server(python: Path, port: int, state: Path, cpus: set[int] | None = None) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        # vLLM's CPU engine binds its OpenMP threads to these cores (one thread each)
        "VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, sorted(cpus))) if cpus else "0",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "VLLM_CACHE_ROOT": str(state),
        "TMPDIR": str(state),
        "XDG_CACHE_HOME": str(state),
        "HF_HOME": str(state),
    }
    cmd = [
        str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(peers.model_dir(MODEL)), "--served-model-name", MODEL,
        "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "2048", "--kv-cache-memory-bytes", "268435456", "--enforce-eager",
    ]  # fmt: skip
    log = (state / "server.log").open("wb")
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=peers.on_cpus(cpus))


def wait_ready(url: str, proc: subprocess.Popen[bytes] | None, timeout: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"bench: the vLLM server exited ({proc.returncode}) before it was ready")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return time.monotonic() - t0
        except OSError:
            pass
        time.sleep(1)
    raise SystemExit(f"bench: {url} not ready after {timeout:.0f} s")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    """The server and its engine processes: they share the session the server started."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


@dataclass(frozen=True)
class Server:
    """What the server itself counted, to tell its part of a TTFT from the client's and to show both
    clients sent the same work: TTFT histogram, prompt tokens, finished requests, prefix-cache hits."""

    ttft: Histogram | None
    prompt_tokens: float
    requests: float
    cache_queries: float
    cache_hits: float


def server_state(url: str) -> Server:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        expo = prometheus.parse(r.read().decode())
    m = {"model_name": MODEL}
    return Server(
        expo.histogram("vllm:time_to_first_token_seconds", m),
        expo.total("vllm:prompt_tokens_total", m) or 0.0,
        expo.total("vllm:request_success_total", m) or 0.0,
        expo.total("vllm:prefix_cache_queries_total", m) or 0.0,
        expo.total("vllm:prefix_cache_hits_total", m) or 0.0,
    )


def spread(values: list[float]) -> str:
    return f"{min(values):.2f}–{max(values):.2f}"


def run_client(name: str, python: Path, url: str, w: Workload, tmp: Path, vllm: peers.VllmBench, i: int, cpu: int | None) -> Figures:
    out = tmp / f"{name}-{i}.json"
    if name == "verify":
        rc, tail, _ = peers.run_pinned(peers.verify_cmd(python, url, w, out), cpu)
        if rc not in (0, 2) or not out.exists():
            raise SystemExit(f"bench: verify failed (exit {rc}):\n{tail}")
        fig = peers.verify_figures(out)
    else:
        vllm.run(peers.vllm_cmd(python, url, MODEL, peers.model_dir(MODEL), w, tmp, out.name))
        fig = peers.vllm_figures(out)
        tail = ""
    if fig.failed or fig.completed != w.requests:
        raise SystemExit(f"bench: {name}: {fig.completed} of {w.requests} requests completed:\n{tail}")
    return fig


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--url", help="a running vLLM serving tiny-llama (default: start one)")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--output-tokens", type=int, default=128)
    p.add_argument("--ready-timeout", type=float, default=300)
    p.add_argument(
        "--no-split", action="store_true",
        help="let the server and the clients share every CPU (default: the clients get the last CPU to themselves, "
        "the server it starts the others)",
    )
    args = p.parse_args()
    server_cpus, client_cpu = partition(not args.no_split)

    python = peers.runtime_python()
    w = Workload(args.concurrency, args.requests, args.prompt_tokens, args.output_tokens)
    tmp = Path(tempfile.mkdtemp(prefix="llmfleet-agreement-"))
    shim = peers.vllm_shim()
    proc = None
    vllm: peers.VllmBench | None = None
    url = args.url
    try:
        if url is None:
            url = f"http://127.0.0.1:{free_port()}"
            proc = start_server(python, int(url.rsplit(":", 1)[1]), tmp, server_cpus)
            print(f"vLLM server (pid {proc.pid}) starting at {url} …", flush=True)
        if client_cpu is not None:
            where = f"CPUs {sorted(server_cpus or ())}" if proc is not None else "where it runs"
            print(f"clients on CPU {client_cpu} alone, the server on {where}", flush=True)
        vllm = peers.VllmBench(python, shim, {client_cpu} if client_cpu is not None else None)  # imports vLLM while the server loads
        print(f"ready after {wait_ready(url, proc, args.ready_timeout):.0f} s", flush=True)
        runs: dict[str, list[Figures]] = {"verify": [], "vllm": []}
        gap: dict[str, list[float]] = {"verify": [], "vllm": []}  # client TTFT mean − the server's, ms
        for i in range(args.rounds):
            order = ("verify", "vllm") if i % 2 == 0 else ("vllm", "verify")
            for name in order:
                s0 = server_state(url)
                f = run_client(name, python, url, w, tmp, vllm, i, client_cpu)
                s1 = server_state(url)
                d = s1.ttft - s0.ttft if s0.ttft is not None and s1.ttft is not None else None
                srv = (d.mean or 0.0) * 1000 if d is not None else float("nan")
                gap[name].append(f.ttft_mean_s * 1000 - srv)
                runs[name].append(f)
                n = max(s1.requests - s0.requests, 1.0)
                print(
                    f"  round {i + 1} {name:6}: {f.output_tokens_per_s:8.1f} output tokens/s, TTFT p50 {f.ttft_p50_s * 1000:7.2f} ms, "
                    f"TTFT mean {f.ttft_mean_s * 1000:7.2f} ms (server's {srv:6.2f} ms), TPOT p50 {f.tpot_p50_s * 1000:6.2f} ms, "
                    f"{f.output_tokens} tokens in {f.duration_s:.2f} s; server saw {s1.requests - s0.requests:.0f} requests, "
                    f"{(s1.prompt_tokens - s0.prompt_tokens) / n:.1f} prompt tokens each, prefix-cache hits "
                    f"{s1.cache_hits - s0.cache_hits:.0f} of {s1.cache_queries - s0.cache_queries:.0f} tokens; "
                    f"load {os.getloadavg()[0]:.1f}",
                    flush=True,
                )
    finally:
        if vllm is not None:
            vllm.close()
        if proc is not None:
            stop_server(proc)
        shutil.rmtree(shim, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)

    print(
        f"\nagreement · {w.requests} requests × ({w.prompt_tokens} prompt + {w.output_tokens} output tokens), concurrency {w.concurrency}, "
        f"{args.rounds} rounds, medians:"
    )
    ok = True
    for label, attr, scale, unit in (("output tokens/s", "output_tokens_per_s", 1.0, ""), ("TTFT p50", "ttft_p50_s", 1000.0, " ms")):
        vs = [getattr(f, attr) * scale for f in runs["verify"]]
        bs = [getattr(f, attr) * scale for f in runs["vllm"]]
        v, b = statistics.median(vs), statistics.median(bs)
        diff = v / b - 1
        ok &= abs(diff) <= TARGET
        verdict = "within" if abs(diff) <= TARGET else "OUTSIDE"
        # each round ran both clients seconds apart: its ratio drifts less with the machine's load
        paired = [x / y - 1 for x, y in zip(vs, bs, strict=True)]
        print(
            f"  {label:16} verify.py {v:9.2f}{unit} ({spread(vs)}) · vllm bench serve {b:9.2f}{unit} ({spread(bs)}) · "
            f"{diff:+.1%} ({verdict} ±{TARGET:.0%}); per round {' '.join(f'{x:+.1%}' for x in paired)}, "
            f"median {statistics.median(paired):+.1%}"
        )
    gv, gb = statistics.median(gap["verify"]), statistics.median(gap["vllm"])
    print(f"  TTFT mean, client minus server (vllm:time_to_first_token_seconds): verify.py {gv:+.2f} ms · vllm bench serve {gb:+.2f} ms")
    return 0 if ok else 2


if __name__ == "__main__":
    sys.exit(main())
