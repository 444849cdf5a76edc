#!/usr/bin/env python3
"""Agreement: the same workload through verify.py and ``vllm bench serve`` against one real CPU vLLM.

Starts one vLLM server (the pinned CPU runtime, the tiny model, 127.0.0.1, a free port) unless
``--url`` names a running one, waits for ``/health``, runs a warm-up round, then ``--rounds`` rounds
of the workload: ``--requests`` streaming requests of ``--prompt-tokens`` prompt tokens (as the
server counts them, BOS included) and ``--output-tokens`` output tokens with ``ignore_eos``, at
``--concurrency`` streams. Prints each run's output tokens/s and TTFT p50 as each client reports
them, next to what the server itself counted, then the medians, their difference against the 5 %
agreement target, and the per-round differences; stops the server it started.

``--mode together`` (default) runs both clients at the same time, each the requests at half the
concurrency: the server runs the workload's streams in all and both clients see it in the same
state, moment by moment. The CPU engine's speed drifts by ±20 % from one ten-second stretch to the
next with nothing else running (on this 2-core machine and on a 16-core one alike), so clients run
one after the other (``--mode alternate``, order swapped every round) compare two moments of the
server as much as two clients. Every run sends prompts the server has not seen (verify.py draws a
seed per run; ``vllm bench serve`` gets ``--seed`` per round): a prefix-cache hit would skip the
prefill that TTFT measures. The default prompt (1024 tokens) gives the tiny model a prefill that
dominates TTFT, as a real model's does; at 64 tokens TTFT is ~15 ms and the clients' own overhead
(1.5–2 ms apart) is most of the difference.

The clients run on CPUs of their own (``--client-cpu`` for verify, ``--peer-cpu`` for
``vllm bench serve``, both the last CPU by default) and the server on the others (``--no-split``:
all share): a client that waits for a CPU adds that wait to its TTFT. verify runs as its command
line (``tools/verify.py --url … --no-ladder --no-history``) each time; ``vllm bench serve`` runs as
its own ``main()`` with the command line's arguments, in one process kept for the whole bench (the
CLI subcommand calls exactly that), so that vLLM's 30 s import is paid once.

    .venv/bin/python bench/agreement.py
    .venv/bin/python bench/agreement.py --mode alternate --rounds 12
    .venv/bin/python bench/agreement.py --server-cpus 0-3 --omp-cpus 0 --client-cpu 8 --peer-cpu 9   # a bigger machine
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


def layout(
    args: argparse.Namespace, p: argparse.ArgumentParser
) -> tuple[set[int] | None, set[int] | None, int | None, int | None]:
    """The server's CPUs, its engine's compute (OpenMP) CPUs, verify's CPU and ``vllm bench serve``'s.

    Default: the clients get the last usable CPU alone, the server the others. On a small machine the
    client and the server otherwise take turns on the same cores and each client's TTFT holds its own
    wait for a CPU, which differs between clients (vLLM's asyncio client and verify.py's threads are
    not equally heavy). The engine's compute threads take the server's CPUs but the last two, at
    least one: the engine's scheduler and the API server run on the rest."""
    usable = sorted(os.sched_getaffinity(0))
    if args.no_split or len(usable) < 2:
        return None, None, None, None
    client = args.client_cpu if args.client_cpu is not None else usable[-1]
    peer = args.peer_cpu if args.peer_cpu is not None else client
    server = args.server_cpus or set(usable) - {client, peer}
    omp = args.omp_cpus or set(sorted(server)[: max(1, len(server) - 2)])
    if not {client, peer} | server <= set(usable):
        p.error(f"--server-cpus, --client-cpu and --peer-cpu must be CPUs this process may use: {usable}")
    if not server:
        p.error(f"--client-cpu {client} and --peer-cpu {peer} leave the server no CPU of {usable}")
    if {client, peer} & server:
        p.error(f"--client-cpu {client} or --peer-cpu {peer} is one of --server-cpus: the clients need CPUs of their own")
    if not omp <= server:
        p.error(f"--omp-cpus {sorted(omp)} must be among --server-cpus {sorted(server)}")
    return server, omp, client, peer


def cpus_arg(text: str) -> set[int]:
    try:
        return peers.cpu_list(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def start_server(
    python: Path, port: int, state: Path, cpus: set[int] | None = None, omp: set[int] | None = None
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        # vLLM's CPU worker binds its OpenMP threads to these cores (one thread each)
        "VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, sorted(omp or cpus or {0}))),
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


def verify_result(rc: int | None, tail: str, out: Path) -> Figures:
    """verify's figures from its JSON; it must have measured (exit 0 or 2: targets met or missed)."""
    if rc not in (0, 2) or not out.exists():
        raise SystemExit(f"bench: verify failed (exit {rc}):\n{tail[-3000:]}")
    return peers.verify_figures(out)


def completed(name: str, fig: Figures, w: Workload) -> Figures:
    if fig.failed or fig.completed != w.requests:
        raise SystemExit(f"bench: {name}: {fig.completed} of {w.requests} requests completed")
    return fig


def run_alone(name: str, python: Path, url: str, w: Workload, tmp: Path, vllm: peers.VllmBench, i: int, cpu: int | None) -> Figures:
    out = tmp / f"{name}-{i}.json"
    if name == "verify":
        rc, tail, _ = peers.run_pinned(peers.verify_cmd(python, url, w, out), cpu)
        return completed(name, verify_result(rc, tail, out), w)
    vllm.run(peers.vllm_cmd(python, url, MODEL, peers.model_dir(MODEL), w, tmp, out.name, seed=1000 + i))
    return completed(name, peers.vllm_figures(out), w)


def run_together(python: Path, url: str, w: Workload, tmp: Path, vllm: peers.VllmBench, i: int, cpu: int | None) -> dict[str, Figures]:
    """Both clients at once, each with the workload's requests at half its concurrency: the server
    runs ``w.concurrency`` streams in all and each client sees the same server, moment by moment. The
    one started first alternates with the round (``i``): the few hundred milliseconds one runs alone
    at the start fall to each in turn. ``cpu``: verify's (``vllm`` was pinned when it started)."""
    out = {"verify": tmp / f"verify-{i}.json", "vllm": tmp / f"vllm-{i}.json"}
    bcmd = peers.vllm_cmd(python, url, MODEL, peers.model_dir(MODEL), w, tmp, out["vllm"].name, seed=1000 + i)

    def start_verify() -> subprocess.Popen[str]:
        pin = peers.on_cpus({cpu} if cpu is not None else None)
        vcmd = peers.verify_cmd(python, url, w, out["verify"])
        return subprocess.Popen(vcmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=pin)

    if i % 2 == 0:
        verify = start_verify()
        vllm.submit(bcmd)
    else:
        vllm.submit(bcmd)
        verify = start_verify()
    vllm.wait()
    tail, _ = verify.communicate(timeout=600)
    return {
        "verify": completed("verify", verify_result(verify.returncode, tail, out["verify"]), w),
        "vllm": completed("vllm", peers.vllm_figures(out["vllm"]), w),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--url", help="a running vLLM serving tiny-llama (default: start one)")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=1024)
    p.add_argument("--output-tokens", type=int, default=128)
    p.add_argument("--warmup", type=int, default=1, help="rounds run first and not counted (default 1)")
    p.add_argument("--ready-timeout", type=float, default=300)
    p.add_argument("--server-cpus", type=cpus_arg, metavar="LIST", help="CPUs of the server it starts, as 0-5 (default: the others)")
    p.add_argument(
        "--omp-cpus", type=cpus_arg, metavar="LIST",
        help="CPUs of the engine's compute threads (default: the server's but the last two, at least one)",
    )  # fmt: skip
    p.add_argument("--client-cpu", type=int, metavar="N", help="the CPU verify.py runs on, alone (default: the last)")
    p.add_argument(
        "--mode", choices=("together", "alternate"), default="together",
        help="together (default): both clients at once, each the requests at half the concurrency; alternate: one after "
        "the other, the whole workload each, the order swapped every round",
    )  # fmt: skip
    p.add_argument("--peer-cpu", type=int, metavar="N", help="the CPU of vllm bench serve (default: the clients' CPU)")
    p.add_argument(
        "--no-split", action="store_true",
        help="let the server and the clients share every CPU (default: the clients get a CPU to themselves, the server the others)",
    )
    args = p.parse_args()
    server_cpus, omp_cpus, client_cpu, peer_cpu = layout(args, p)
    if args.mode == "together" and args.concurrency < 2:
        p.error("--mode together needs --concurrency 2 or more: each client runs half of it")

    python = peers.runtime_python()
    w = Workload(args.concurrency, args.requests, args.prompt_tokens, args.output_tokens)
    each = Workload(args.concurrency // 2, args.requests, args.prompt_tokens, args.output_tokens) if args.mode == "together" else w
    tmp = Path(tempfile.mkdtemp(prefix="llmfleet-agreement-"))
    shim = peers.vllm_shim()
    proc = None
    vllm: peers.VllmBench | None = None
    url = args.url
    try:
        if url is None:
            url = f"http://127.0.0.1:{free_port()}"
            proc = start_server(python, int(url.rsplit(":", 1)[1]), tmp, server_cpus, omp_cpus)
            print(f"vLLM server (pid {proc.pid}) starting at {url} …", flush=True)
        if client_cpu is not None:
            where = "where it runs"
            if proc is not None:
                where = f"CPUs {sorted(server_cpus or ())} (compute threads on {sorted(omp_cpus or ())})"
            print(f"verify.py on CPU {client_cpu}, vllm bench serve on CPU {peer_cpu}, the server on {where}", flush=True)
        vllm = peers.VllmBench(python, shim, {peer_cpu} if peer_cpu is not None else None)  # imports vLLM while the server loads
        print(f"ready after {wait_ready(url, proc, args.ready_timeout):.0f} s", flush=True)
        runs: dict[str, list[Figures]] = {"verify": [], "vllm": []}
        gap: dict[str, list[float]] = {"verify": [], "vllm": []}  # client TTFT mean − the server's, ms
        for i in range(-args.warmup, args.rounds):
            order = ("verify", "vllm") if i % 2 == 0 else ("vllm", "verify")
            measured: dict[str, tuple[Figures, Server, Server]] = {}  # figures, server state before and after
            if args.mode == "together":
                s0 = server_state(url)
                figs = run_together(python, url, each, tmp, vllm, i, client_cpu)
                s1 = server_state(url)
                measured = {name: (figs[name], s0, s1) for name in order}
            else:
                for name in order:
                    s0 = server_state(url)
                    f = run_alone(name, python, url, w, tmp, vllm, i, client_cpu)
                    measured[name] = (f, s0, server_state(url))
            for name in order:
                f, s0, s1 = measured[name]
                d = s1.ttft - s0.ttft if s0.ttft is not None and s1.ttft is not None else None
                srv = (d.mean or 0.0) * 1000 if d is not None else float("nan")
                if i >= 0:
                    gap[name].append(f.ttft_mean_s * 1000 - srv)
                    runs[name].append(f)
                n = max(s1.requests - s0.requests, 1.0)
                print(
                    f"  {f'round {i + 1}' if i >= 0 else 'warm-up':8} {name:6}: {f.output_tokens_per_s:8.1f} output tokens/s, "
                    f"TTFT p50 {f.ttft_p50_s * 1000:7.2f} ms, "
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

    model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")), "?")
    print(
        f"\n{os.cpu_count()} × {model}; server on CPUs {sorted(server_cpus) if server_cpus else 'all'}, "
        f"compute threads on {sorted(omp_cpus) if omp_cpus else 'all'}, verify.py on {client_cpu if client_cpu is not None else 'all'}, "
        f"vllm bench serve on {peer_cpu if peer_cpu is not None else 'all'}"
    )
    how = (
        f"both at once, each {each.requests} requests at concurrency {each.concurrency} ({w.concurrency} streams in all)"
        if args.mode == "together"
        else f"{w.requests} requests at concurrency {w.concurrency}, one client after the other"
    )
    print(f"agreement · ({w.prompt_tokens} prompt + {w.output_tokens} output tokens), {how}, {args.rounds} rounds, medians:")
    ok = True
    for label, attr, scale, unit in (("output tokens/s", "output_tokens_per_s", 1.0, ""), ("TTFT p50", "ttft_p50_s", 1000.0, " ms")):
        vs = [getattr(f, attr) * scale for f in runs["verify"]]
        bs = [getattr(f, attr) * scale for f in runs["vllm"]]
        v, b = statistics.median(vs), statistics.median(bs)
        diff = v / b - 1
        ok &= abs(diff) <= TARGET
        verdict = "within" if abs(diff) <= TARGET else "OUTSIDE"
        # each round ran both clients seconds apart (or at once): its ratio drifts less with the server's speed
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
