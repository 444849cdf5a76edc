"""``tools/plan.py``: print the plan of an inventory's hosts, or refuse it with the reasons."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..errors import Problem
from ..inventory import load_inventory
from ..pins import DEFAULT_LOCK, load_lock
from ..plan import evaluate_fleet
from .common import ExitCode, dump_json, run

ENVELOPE = "llmfleet.plan/1"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="plan.py", description="Evaluate inventory spec + pins into per-host plans.")
    p.add_argument("-i", "--inventory", required=True, help="inventory directory or hosts file, e.g. inventory/lab")
    p.add_argument("--host", help="only this host (an Ansible host pattern)")
    p.add_argument("--lock", help=f"pins lock file (default: $LLMFLEET_LOCK or {DEFAULT_LOCK})")
    p.add_argument("--json", action="store_true", help="print a versioned JSON envelope for machines")
    p.add_argument("--strict", action="store_true", help="also refuse unresolved pins (what a deploy does)")
    return p


def _human(plans: dict[str, dict[str, Any]], problems: list[Problem]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 160, soft_wrap=True)
    for host, plan in plans.items():
        table = Table(title=f"{host}  ·  generation {plan['generation']}  ·  {plan['hardware_profile']}  ·  {plan['runtime']['key']}")
        for col in ("instance", "model", "devices", "tp×pp", "bind:port", "max_len", "targets"):
            table.add_column(col)
        for inst in plan["instances"]:
            t = inst["targets"]
            targets = ", ".join(f"{k}={v}" for k, v in t.items()) or "-"
            table.add_row(
                inst["name"],
                inst["model"],
                ",".join(map(str, inst["devices"])),
                f"{inst['tensor_parallel']}×{inst['pipeline_parallel']}",
                f"{inst['bind']}:{inst['port']}",
                str(inst["max_model_len"]),
                targets,
            )
        console.print(table)
        console.print(f"  runtime store: {plan['runtime']['store_path']}")
        for key, model in plan["models"].items():
            console.print(f"  model {key}: {model['store_path']}")
        for u in plan["unresolved"]:
            console.print(f"  [yellow]unresolved[/]: {u} (a deploy refuses this host until it is pinned)")
        for w in plan["warnings"]:
            console.print(f"  [yellow]warning[/]: {w}")
    for p in problems:
        print(f"refused: {p}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def _main() -> int:
        hosts = load_inventory(args.inventory, args.host)
        lock = load_lock(args.lock)
        plans, problems = evaluate_fleet(hosts, lock)
        unresolved = {h: p["unresolved"] for h, p in plans.items() if p["unresolved"]}
        ok = not problems and not (args.strict and unresolved)
        if args.json:
            dump_json({
                "schema": ENVELOPE,
                "ok": ok,
                "plans": plans,
                "problems": [p.to_dict() for p in problems],
            })
        else:
            _human(plans, problems)
            if args.strict:
                for h, items in unresolved.items():
                    for u in items:
                        print(f"refused: {h}: {u}", file=sys.stderr)
        return ExitCode.OK if ok else ExitCode.REFUSED

    return run(_main)
