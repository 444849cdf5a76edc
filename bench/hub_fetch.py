"""Figures of pinning and fetching a model from a hub: files, bytes, time, and what a killed fetch resends.

Starts the project's test hub (tests/testhub) on loopback, publishes a sharded checkpoint of random
shards and the four production repos (config-complete, small weights), then runs ``tools/pin.py``
as an operator would (``model add``, ``fetch``; a second fetch killed at a given share of the
first shard and run again) and prints a table. The hub can be throttled per connection to stand in
for a slow link (``--rate``). Nothing here is a test: tests/unit/artifacts asserts the behaviour.

    PATH=$PWD/.venv/bin:$PATH python bench/hub_fetch.py                       # 8 shards of 64 MiB
    python bench/hub_fetch.py --shards 4 --shard-mib 256 --jobs 1 --jobs 4     # bigger shards, one and four at a time
    python bench/hub_fetch.py --rate 50                                        # 50 MiB/s per connection
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "tools"))

from testhub import TestHub  # noqa: E402
from testhub.checkpoints import PRODUCTION_KEYS, production, sharded  # noqa: E402

MiB = 1 << 20


def pin_py(env: dict[str, str], *argv: str) -> tuple[int, float, str]:
    started = time.monotonic()
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "pin.py"), *argv], env=env, capture_output=True, text=True, check=False)
    return proc.returncode, time.monotonic() - started, proc.stdout + proc.stderr


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--shard-mib", type=int, default=64)
    p.add_argument("--jobs", type=int, action="append", help="files at once (repeatable; default 4)")
    p.add_argument("--rate", type=float, help="MiB/s per connection the hub serves at (default: as fast as it can)")
    p.add_argument("--kill-at", type=float, default=0.6, help="share of the first shard after which a fetch is killed")
    args = p.parse_args()
    jobs = args.jobs or [4]
    shard = args.shard_mib * MiB
    rows: list[tuple[str, str]] = []
    with TestHub() as hub, tempfile.TemporaryDirectory(prefix="llmfleet-bench-") as tmp:
        work = Path(tmp)
        files = sharded(args.shards, shard, seed=1)
        hub.publish("bench/sharded", files)
        for repo, content in production().items():
            hub.publish(repo, content)
        if args.rate:
            hub.throttle(args.rate * MiB)
        total = sum(len(b) for b in files.values())
        lock = work / "lock.json"
        base = dict(os.environ, HF_ENDPOINT=hub.endpoint, HF_HOME=str(work / "hf"), LLMFLEET_LOCK=str(lock), PYTHONPATH=str(REPO / "tools"))
        base.pop("HF_TOKEN", None)
        rc, took, out = pin_py(base, "model", "add", "m", "hf://bench/sharded")
        assert rc == 0, out
        rows.append(("pin: model add (sharded)", f"{len(files)} files, {total / MiB:.0f} MiB pinned in {took:.2f} s, "
                     f"{len(hub.requests)} requests"))
        before = len(hub.requests)
        started = time.monotonic()
        for key, repo in PRODUCTION_KEYS.items():
            rc, _, out = pin_py(base, "model", "add", key, f"hf://{repo}")
            assert rc == 0, out
        rows.append(("pin: the 4 production repos", f"{time.monotonic() - started:.2f} s, {len(hub.requests) - before} requests"))
        for j in jobs:
            env = dict(base, LLMFLEET_CACHE=str(work / f"cache-{j}"))
            rc, took, out = pin_py(env, "fetch", "--model", "m", "--jobs", str(j))
            assert rc == 0, out
            rows.append((f"fetch, cold, --jobs {j}", f"{total / MiB:.0f} MiB in {took:.2f} s = {total / MiB / took:.0f} MiB/s"))
            rc, took, out = pin_py(env, "fetch", "--model", "m")
            rows.append(("fetch again (all present)", f"{took:.2f} s"))
        # killed and resumed
        env = dict(base, LLMFLEET_CACHE=str(work / "cache-kill"))
        first = hashlib.sha256(files[f"model-00001-of-{args.shards:05d}.safetensors"]).hexdigest()
        served0 = hub.served(first)
        sent_before = sum(hub.bytes_served.values())
        proc = subprocess.Popen([sys.executable, str(REPO / "tools" / "pin.py"), "fetch", "--model", "m", "--jobs", str(jobs[-1])],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        while hub.served(first) - served0 < args.kill_at * shard and proc.poll() is None:
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        killed = sum(hub.bytes_served.values()) - sent_before
        rc, took, out = pin_py(env, "fetch", "--model", "m", "--jobs", str(jobs[-1]))
        assert rc == 0, out
        sent = sum(hub.bytes_served.values()) - sent_before
        rows.append((f"fetch killed at {args.kill_at:.0%} of shard 1", f"{killed / MiB:.1f} MiB had crossed"))
        rows.append(("resumed fetch", f"{took:.2f} s; {(sent - killed) / MiB:.1f} MiB sent; resent {(sent - total) / MiB:.2f} MiB "
                     f"({(sent - total) / shard:.1%} of one shard)"))
        shutil.rmtree(work / "hf", ignore_errors=True)
    width = max(len(k) for k, _ in rows)
    rate = f", {args.rate:.0f} MiB/s per connection" if args.rate else ""
    print(f"test hub on loopback, {args.shards} shards x {args.shard_mib} MiB{rate}")
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
