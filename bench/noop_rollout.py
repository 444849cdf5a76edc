"""Figures of a no-op rollout: per-host seconds of ``site.yml`` on a converged lab fleet of 2, 4 and 16 hosts.

Boots lab hosts of its own (``nb01``…, 10.213.0.101…; ``tools/lab.py`` with an inventory written under
``out/bench/noop/``), rolls them out once, then runs ``site.yml`` again on the converged fleet, with the
fast path (the default) and with every stage (``-e rollout_fast_path=false``, what a no-op rollout did
before the fast path), and prints per fleet size: wall time, wall time per host, the control node's CPU
time per host (ansible-playbook and its children, user + system), tasks per host, the slowest host's
own time (summary.json). Sizes grow on the same hosts (2, then 2 more, then 12 more); it stops and
removes its hosts at the end (``--keep`` leaves them).

Engines: ``stub`` (default) runs bench/stub_engine.py in place of vLLM on every host (a few MB each: 16
hosts fit where 16 CPU vLLMs, ~2.5 GB each, do not); a no-op rollout never restarts an instance, so the
engine only answers the probes. The stub serves no completions, so the first rollout skips verify and
marks each generation verified (what a passing verify leaves). ``vllm`` runs the real CPU vLLM (its
first rollout builds the runtime and verifies; 4 hosts at most on this machine's memory).

Run it under the lab lock, as root:

    flock /tmp/llmfleet-lab.lock env LLMFLEET_LAB_DIR=$PWD/.lab .venv/bin/python bench/noop_rollout.py
    .venv/bin/python bench/noop_rollout.py --sizes 2,4 --engine vllm --runs 1
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import stub_engine  # noqa: E402
import yaml  # noqa: E402

BIN = Path(sys.executable).parent
OUT = REPO / "out" / "bench" / "noop"
CACHE = Path(os.environ.get("LLMFLEET_CACHE") or Path.home() / ".cache" / "llmfleet")
LAB_DIR = Path(os.environ.get("LLMFLEET_LAB_DIR") or REPO / ".lab")
FLEET = REPO / "inventory" / "lab-fleet"
RECAP = re.compile(r"^(nb\d+)\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)\s+skipped=(\d+)", re.MULTILINE)


def host_name(i: int) -> str:
    return f"nb{i:02d}"


def write_inventory(where: Path, count: int, runtime: str, cache: Path) -> Path:
    """N hosts shaped like the lab fleet's (its connection vars and its instances, alternating core groups)."""
    shutil.rmtree(where, ignore_errors=True)
    (where / "group_vars").mkdir(parents=True)
    (where / "host_vars").mkdir()
    hosts = {host_name(i): {"ansible_host": f"10.213.0.{100 + i}"} for i in range(1, count + 1)}
    (where / "hosts.yml").write_text(yaml.safe_dump({"all": {"children": {"lab": {"hosts": hosts}}}}, sort_keys=False))
    shutil.copy(FLEET / "group_vars" / "lab.yml", where / "group_vars" / "lab.yml")
    spec = yaml.safe_load((FLEET / "group_vars" / "all.yml").read_text())
    spec.update(
        llmfleet_runtime=runtime,
        vllm_runtime_wheelhouse=f"/srv/llmfleet/wheelhouse/{runtime}",
        model_store_source_dir=str(cache / "models"),
    )
    (where / "group_vars" / "all.yml").write_text(yaml.safe_dump(spec, sort_keys=False))
    for i in range(1, count + 1):
        shutil.copy(FLEET / "host_vars" / f"fl{1 + (i + 1) % 2}.yml", where / "host_vars" / f"{host_name(i)}.yml")
    return where


class Bench:
    def __init__(self, engine: str) -> None:
        self.engine = engine
        OUT.mkdir(parents=True, exist_ok=True)
        self.lock: Path | None = None
        self.cache = CACHE
        if engine == "stub":
            # a cache of its own: the rootfs and the models of the real one, a wheelhouse holding the stub wheel
            self.cache = OUT / "cache"
            (self.cache / "wheelhouse").mkdir(parents=True, exist_ok=True)
            for name in ("rootfs", "models"):
                link = self.cache / name
                if not link.exists():
                    link.symlink_to(CACHE / name)
            self.lock = OUT / "lock.json"
            stub_engine.write_stub(REPO / "pins" / "lock.json", self.cache / "wheelhouse", self.lock)
        self.runtime = stub_engine.RUNTIME_KEY if engine == "stub" else stub_engine.BASE_RUNTIME
        self.runs = 0

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            ANSIBLE_CONFIG=str(REPO / "ansible.cfg"),
            LLMFLEET_LAB_DIR=str(LAB_DIR),
            LLMFLEET_CACHE=str(self.cache),
            ANSIBLE_NOCOLOR="1",
            PATH=f"{BIN}:{env.get('PATH', '')}",
        )
        if self.lock:
            env["LLMFLEET_LOCK"] = str(self.lock)
        env.update(extra)
        return env

    def lab(self, command: str, inventory: Path) -> None:
        proc = subprocess.run(
            [sys.executable, str(REPO / "tools" / "lab.py"), command, "-i", str(inventory / "hosts.yml")],
            cwd=REPO, env=self.env(), capture_output=True, text=True, check=False,
        )  # fmt: skip
        if proc.returncode != 0:
            raise SystemExit(f"tools/lab.py {command} failed:\n{proc.stdout}{proc.stderr}")

    def playbook(self, inventory: Path, playbook: str, *args: str) -> dict[str, Any]:
        self.runs += 1
        run_dir = OUT / "runs" / f"{self.runs:02d}-{Path(playbook).stem}"
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        argv = [str(BIN / "ansible-playbook"), "-i", str(inventory), str(REPO / playbook), *args]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.monotonic()
        proc = subprocess.run(argv, cwd=REPO, env=self.env(LLMFLEET_RUN_DIR=str(run_dir)), capture_output=True, text=True, check=False)
        wall = time.monotonic() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        output = proc.stdout + proc.stderr
        (run_dir / "ansible.log").write_text(" ".join(argv) + "\n\n" + output)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(argv[1:])} failed (exit {proc.returncode}); log: {run_dir / 'ansible.log'}\n{output[-3000:]}")
        summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {"hosts": {}}
        recap = {m[0]: {"ok": int(m[1]), "skipped": int(m[5])} for m in RECAP.findall(output)}
        return {
            "wall_s": wall,
            "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
            "recap": recap,
            "durations": {h: v.get("duration_s") for h, v in summary["hosts"].items()},
            "converged": sum(bool(v.get("converged")) for v in summary["hosts"].values()),
        }

    def converge(self, inventory: Path, new: list[str]) -> None:
        """Roll the new hosts out, verified (the stub: marked verified)."""
        limit = ["-l", ",".join(new)]
        if self.engine == "stub":  # the stub serves no completions: no verify; its generation is marked as verify would
            self.playbook(inventory, "site.yml", "-e", '{"rollout_batches": ["100%"]}', "--skip-tags", "verify", *limit)
            mark = OUT / "mark-verified.yml"
            mark.write_text(
                yaml.safe_dump(
                    [
                        {
                            "name": "Bench | Mark the running generation verified (the stub engine cannot be measured)",
                            "hosts": "all",
                            "gather_facts": False,
                            "tasks": [
                                {"name": "Bench | Plan the host", "llmfleet_plan": {"strict": True}},
                                {
                                    "name": "Bench | Mark it verified",
                                    "llmfleet_generation": {
                                        "action": "mark",
                                        "root": "{{ ansible_facts.llmfleet_plan.root }}",
                                        "generation": "{{ ansible_facts.llmfleet_plan.generation }}",
                                        "verdict": "verified",
                                        "detail": {"bench": "stub engine, not measured"},
                                    },
                                },
                            ],
                        }
                    ],
                    sort_keys=False,
                )
            )
            self.playbook(inventory, str(mark.relative_to(REPO)), *limit)
        else:
            self.playbook(inventory, "site.yml", "-e", '{"rollout_batches": ["100%"]}', *limit)

    def measure(self, inventory: Path, count: int, runs: int, full_runs: int) -> list[dict[str, Any]]:
        rows = []
        for label, extra, n in (("every stage", ["-e", "rollout_fast_path=false"], full_runs), ("fast path", [], runs)):
            results = [self.playbook(inventory, "site.yml", *extra) for _ in range(n)]
            walls = [r["wall_s"] for r in results]
            cpus = [r["cpu_s"] for r in results]
            last = results[-1]
            rows.append(
                {
                    "hosts": count,
                    "path": label,
                    "runs": n,
                    "wall_s": round(statistics.median(walls), 1),
                    "wall_s_per_host": round(statistics.median(walls) / count, 2),
                    "control_cpu_s_per_host": round(statistics.median(cpus) / count, 2),
                    "tasks_ok_per_host": round(statistics.mean(v["ok"] for v in last["recap"].values()), 1),
                    "slowest_host_s": max((d for d in last["durations"].values() if d is not None), default=None),
                    "converged_hosts": last["converged"],
                }
            )
            print(f"  {count:>3} hosts, {label:<11}: {rows[-1]}", flush=True)
        return rows


def table(rows: list[dict[str, Any]], engine: str) -> str:
    head = ("hosts", "path", "runs", "wall s", "wall s/host", "control CPU s/host", "tasks ok/host", "slowest host s")
    keys = ("hosts", "path", "runs", "wall_s", "wall_s_per_host", "control_cpu_s_per_host", "tasks_ok_per_host", "slowest_host_s")
    lines = [[str(r[k]) for k in keys] for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]
    out = [f"no-op rollout of a converged lab fleet ({engine} engine; site.yml, batches 1, 25 %, 100 %; median of the runs)"]
    out.append("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)))
    out += ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in lines]
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="2,4,16", help="fleet sizes, growing (default 2,4,16)")
    p.add_argument("--engine", choices=["stub", "vllm"], default="stub")
    p.add_argument("--runs", type=int, default=3, help="fast-path runs per size (default 3)")
    p.add_argument("--full-runs", type=int, default=1, help="every-stage runs per size (default 1)")
    p.add_argument("--keep", action="store_true", help="leave the bench hosts running")
    args = p.parse_args()
    if os.geteuid() != 0:
        print("error: the lab needs root (systemd-nspawn, network namespaces)", file=sys.stderr)
        return 1
    sizes = sorted({int(s) for s in args.sizes.split(",")})
    if sizes[-1] > 16 or (args.engine == "vllm" and sizes[-1] > 4):
        print("error: at most 16 hosts (10.213.0.101-116), and 4 with --engine vllm (memory)", file=sys.stderr)
        return 1
    bench = Bench(args.engine)
    inventory = OUT / "inventory"
    rows: list[dict[str, Any]] = []
    booted = 0
    try:
        for count in sizes:
            write_inventory(inventory, count, bench.runtime, bench.cache)
            started = time.monotonic()
            bench.lab("up", inventory)
            bench.converge(inventory, [host_name(i) for i in range(booted + 1, count + 1)])
            booted = count
            print(f"{count} hosts up and converged in {time.monotonic() - started:.0f} s", flush=True)
            rows += bench.measure(inventory, count, args.runs, args.full_runs)
    finally:
        if booted and not args.keep:
            write_inventory(inventory, booted, bench.runtime, bench.cache)
            bench.lab("down", inventory)
            for i in range(1, booted + 1):
                subprocess.run(["rm", "-rf", "--one-file-system", str(LAB_DIR / "machines" / host_name(i))], check=False)
    text = table(rows, args.engine)
    print(text)
    (OUT / "figures.json").write_text(json.dumps({"engine": args.engine, "rows": rows}, indent=2) + "\n")
    print(f"(raw runs and summaries: {OUT / 'runs'}; figures: {OUT / 'figures.json'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
