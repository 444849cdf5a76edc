#!/usr/bin/env python3
"""Run the planned captures on a GPU machine: start each instance from its plan's argv, record.

    PYTHONPATH=/root/site python3 bench/gpu/run_captures.py --manifest .gpu/manifest.json \
        --models .gpu/models --out /root/results [--deadline 1500] [--only ID ...]

For every capture of the manifest (``prepare.py plan``), in order, unless its result exists:
the plan's argv with the runtime's interpreter replaced by this one, the model's store path by
the config-only checkpoint, ``--load-format dummy`` added; the plan's environment with the state
folder moved under ``--state``; ``memhook/`` on PYTHONPATH (vLLM's own memory figures in bytes).
It waits for ``/health`` (or the process's end), reads ``/metrics`` (``vllm:cache_config_info``),
keeps vLLM's memory log lines and the whole log, stops the server (SIGTERM to its process group,
SIGKILL after 30 s) and waits for the GPU memory to be released before the next one.

A capture marked ``serve_for_agreement`` stays up for ``tools/verify.py`` and ``vllm bench serve``
with the same workload, one after the other, order swapped every round (``--rounds``): each
client's output tokens/s and TTFT p50 are written next to the capture. Work stops starting new
captures past ``--deadline`` seconds (the lent machine's time is short); what ran is kept.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: the checkout (bench/gpu/ in the repository, or a copy of this folder elsewhere in it)
ROOT = next(p for p in HERE.parents if (p / "tools" / "verify.py").exists())
sys.path.insert(0, str(ROOT / "bench"))

MEMORY_LINES = re.compile(
    r"Actual usage is|Available KV cache memory|GPU KV cache size|Maximum concurrency|Model loading took|"
    r"Graph capturing finished|CUDA graph|torch.compile take|Encoder cache|profiled with|max_num_batched_tokens|"
    r"max_num_seqs|Using .* backend|attention backend|Marlin|[Ff]ree memory on device|Memory profiling|"
    r"non_torch|Defaulting|Error|error|Traceback|mamba|block_size|page size|kv cache|KV cache"
)
STATE = "/var/lib/llmfleet/state/"


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def fetch(url: str, timeout: float = 5) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def gpu_used_mib() -> int | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=20
        ).stdout
        return int(out.split()[0])
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None


def run_argv(cap: dict, models: Path) -> list[str]:
    argv = [sys.executable, *cap["argv"][1:]]
    argv = [str(models / cap["model"]) if a == cap["model_store"] else a for a in argv]
    return [*argv, "--load-format", "dummy"]


def run_env(cap: dict, state: Path, hook_out: Path) -> dict[str, str]:
    env = dict(os.environ)
    for k, v in cap["environment"].items():
        env[k] = v.replace(STATE, str(state) + "/")
    site = os.environ.get("PYTHONPATH", "")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE / "memhook"), site) if p)
    env["LLMFLEET_MEMHOOK_OUT"] = str(hook_out)
    # FlashInfer's sampler JIT-compiles its kernels at the first start (nvcc, minutes): the
    # captures sample with PyTorch's top-k/top-p instead (vLLM's fallback on GPUs FlashInfer lacks)
    env.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    for var in ("HOME", "TMPDIR", "XDG_CACHE_HOME", "VLLM_CACHE_ROOT", "HF_HOME"):
        Path(env[var]).mkdir(parents=True, exist_ok=True)
    return env


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        except ProcessLookupError:
            pass
    # stray children (the engine core) of the group
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    for _ in range(60):
        used = gpu_used_mib()
        if used is not None and used < 2048:
            return
        time.sleep(1)


def agreement(url: str, cap: dict, models: Path, out: Path, rounds: int) -> dict:
    """verify.py and vllm bench serve, the same workload, one after the other, order swapped each round."""
    import peers
    from peers import Workload

    w = Workload(concurrency=16, requests=128, prompt_tokens=1024, output_tokens=128)
    name = cap["argv"][cap["argv"].index("--served-model-name") + 1]
    bench = peers.VllmBench(sys.executable, Path(os.environ.get("PYTHONPATH", "")))
    rows = []
    try:
        bench.run(peers.vllm_cmd(sys.executable, url, name, models / cap["model"], w, out, "warmup.json", seed=999))
        for r in range(rounds):
            order = ["verify", "vllm"] if r % 2 == 0 else ["vllm", "verify"]
            for client in order:
                if client == "verify":
                    path = out / f"verify-{r}.json"
                    subprocess.run(peers.verify_cmd(sys.executable, url, w, path), check=False, capture_output=True, timeout=600)
                    fig = peers.verify_figures(path)
                else:
                    bench.run(peers.vllm_cmd(sys.executable, url, name, models / cap["model"], w, out, f"vllm-{r}.json", seed=r + 1))
                    fig = peers.vllm_figures(out / f"vllm-{r}.json")
                rows.append({"round": r, **fig.__dict__})
                log(f"  round {r} {fig.client}: {fig.output_tokens_per_s:.0f} tok/s, TTFT p50 {fig.ttft_p50_s * 1000:.1f} ms")
    finally:
        bench.close()
    med = {}
    for client in ("verify", "vllm bench serve"):
        mine = [x for x in rows if x["client"] == client]
        med[client] = {
            "output_tokens_per_s": statistics.median(x["output_tokens_per_s"] for x in mine),
            "ttft_p50_s": statistics.median(x["ttft_p50_s"] for x in mine),
        }
    return {"workload": w.__dict__, "rounds": rows, "medians": med}


def verify_with_plan(url: str, cap: dict, out: Path) -> dict:
    """tools/verify.py --plan: the live KV capacity against the plan's, and its served-model checks."""
    plan_path = out / "plan.json"
    path = out / "verify-plan.json"
    cmd = [sys.executable, str(ROOT / "tools" / "verify.py"), "--url", url, "--json", "--output", str(path), "--no-history",
           "--no-progress", "--concurrency", "8", "--requests", "32", "--prompt-tokens", "512", "--output-tokens", "64"]  # fmt: skip
    if plan_path.exists():
        cmd += ["--plan", str(plan_path), "--instance", cap["model"].replace(".", "-"), "--ready-timeout", "30"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    return {"exit": proc.returncode, "stdout_tail": proc.stdout[-3000:], "stderr_tail": proc.stderr[-3000:]}


def one(cap: dict, args: argparse.Namespace) -> dict:
    out = Path(args.out) / cap["id"].replace("@", "-")
    shutil.rmtree(out, ignore_errors=True)
    hook = out / "memhook"
    hook.mkdir(parents=True)
    argv = run_argv(cap, Path(args.models))
    env = run_env(cap, Path(args.state), hook)
    port = argv[argv.index("--port") + 1]
    url = f"http://127.0.0.1:{port}"
    logfile = out / "vllm.log"
    t0 = time.monotonic()
    result: dict = {"id": cap["id"], "argv_run": argv, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with logfile.open("w") as lf:
        proc = subprocess.Popen(argv, stdout=lf, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        healthy = False
        try:
            while time.monotonic() - t0 < args.start_timeout:
                if proc.poll() is not None:
                    break
                try:
                    if fetch(url + "/health", 2) is not None:
                        healthy = True
                        break
                except OSError:
                    pass
                time.sleep(1)
            result["ready_s"] = round(time.monotonic() - t0, 1)
            result["healthy"] = healthy
            result["exit_code"] = proc.poll()
            if healthy:
                metrics = fetch(url + "/metrics", 10)
                result["cache_config_info"] = [ln for ln in metrics.splitlines() if ln.startswith("vllm:cache_config_info")]
                result["models"] = json.loads(fetch(url + "/v1/models", 10))
                result["gpu_used_mib_serving"] = gpu_used_mib()
                if cap.get("serve_for_agreement"):
                    if cap.get("plan"):
                        (out / "plan.json").write_text(json.dumps(cap["plan"]))
                    result["verify_plan"] = verify_with_plan(url, cap, out)
                    result["agreement"] = agreement(url, cap, Path(args.models), out, args.rounds)
        finally:
            stop(proc)
    text = logfile.read_text(errors="replace")
    result["memory_log_lines"] = [ln for ln in text.splitlines() if MEMORY_LINES.search(ln)][-120:]
    with gzip.open(out / "vllm.log.gz", "wt") as g:
        g.write(text)
    logfile.unlink()
    result["memhook"] = {p.name: json.loads(p.read_text()) for p in sorted(hook.glob("*.json"))}
    result["total_s"] = round(time.monotonic() - t0, 1)
    (out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", required=True)
    p.add_argument("--models", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--state", default="/root/state")
    p.add_argument("--only", nargs="*", help="capture ids (default: all, in order)")
    p.add_argument("--deadline", type=float, default=1e9, help="start no capture after this many seconds")
    p.add_argument("--start-timeout", type=float, default=300)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    caps = json.loads(Path(args.manifest).read_text())["captures"]
    if args.only:
        caps = [c for c in caps if c["id"] in args.only]
    t0 = time.monotonic()
    for cap in caps:
        done = Path(args.out) / cap["id"].replace("@", "-") / "result.json"
        if done.exists():
            continue
        if time.monotonic() - t0 > args.deadline:
            log(f"deadline: {cap['id']} not started")
            continue
        if Path(args.out, "STOP").exists():
            log("STOP file: no more captures")
            break
        log(f"{cap['id']}: starting")
        r = one(cap, args)
        kv = r.get("cache_config_info")
        act = [ln for ln in r["memory_log_lines"] if "Actual usage" in ln]
        log(f"{cap['id']}: healthy={r['healthy']} in {r['ready_s']} s; {kv[0][:200] if kv else 'no cache_config_info'}")
        if act:
            log("  " + act[-1][act[-1].find("Actual usage") :][:220])
        elif not r["healthy"]:
            log("  " + " | ".join(r["memory_log_lines"][-6:])[:1500])
    log("all done")
    Path(args.out, "DONE").write_text("done\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
