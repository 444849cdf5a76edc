"""``tools/drift.py``: does each host run what the control node plans for it, unchanged?

Runs ``library/llmfleet_drift.py`` on the inventory's hosts with Ansible's ad-hoc command and adds
the generation comparison ("generation: planned X, host runs Y"). Exit 0 no drift, 3 drift found,
2 the plan refuses a host, 1 a host could not be checked (unreachable, the module failed).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..drift import DRIFT, ENVELOPE, ERROR, OK, REFUSED, drift_hosts
from ..pins import DEFAULT_LOCK
from .common import ExitCode, add_limit, dump_json, run, step


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="drift.py", description="Compare live hosts with their current generation and the plan.")
    p.add_argument("-i", "--inventory", required=True, help="inventory directory or hosts file, e.g. inventory/lab")
    add_limit(p)
    p.add_argument("--lock", help=f"pins lock file (default: $LLMFLEET_LOCK or {DEFAULT_LOCK})")
    p.add_argument("--json", action="store_true", help=f"print a versioned JSON envelope ({ENVELOPE})")
    p.add_argument("--no-hash", action="store_true", help="compare model file sizes only (no sha256 of every weight)")
    p.add_argument("--http-timeout", type=float, default=5.0, help="seconds per /v1/models request (default 5)")
    return p


def exit_code(env: dict[str, Any]) -> int:
    """Could not check beats refused beats drift: an incomplete answer is never reported as a clean one."""
    statuses = {h["status"] for h in env["hosts"].values()}
    if ERROR in statuses:
        return ExitCode.ERROR
    if REFUSED in statuses:
        return ExitCode.REFUSED
    if DRIFT in statuses:
        return ExitCode.DRIFT
    return ExitCode.OK


def _where(item: dict[str, Any]) -> str:
    return str(item.get("instance") or item.get("path") or "-")


def human(env: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 160, soft_wrap=True)
    for host, h in env["hosts"].items():
        gen = h["generation"]
        if h["status"] == OK:
            console.print(f"[green]OK[/] {host}: runs generation {gen['running']} as planned, no drift", highlight=False)
            continue
        if h["status"] == ERROR and not h["drift"]:
            console.print(f"[red]ERROR[/] {host}: could not check: {escape(str(h['error']))}", highlight=False)
            continue
        for reason in h.get("refused", []):
            console.print(f"[red]REFUSED[/] {host}: the plan refuses this host: {escape(reason)}", highlight=False)
        if not h["drift"]:
            continue
        table = Table(title=f"{host}  ·  planned {gen['planned'] or '-'}  ·  runs {gen['running'] or '-'}  ·  {len(h['drift'])} drift")
        for col in ("what", "where", "message"):
            table.add_column(col, overflow="fold")
        for item in h["drift"]:
            table.add_row(str(item.get("what")), escape(_where(item)), escape(str(item.get("message", ""))))
        console.print(table)
        for u in h["unchecked"]:
            console.print(f"  [yellow]unchecked[/] {escape(str(u.get('what')))}: {escape(str(u.get('reason')))}", highlight=False)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def _main() -> int:
        what = "sizes and change times of the store" if args.no_hash else "every model file hashed; --no-hash for sizes only"
        with step(f"drift: checking the hosts of {args.inventory}{' -l ' + args.limit if args.limit else ''} ({what})"):
            env = drift_hosts(args.inventory, args.limit, args.lock, hash_files=not args.no_hash, http_timeout=args.http_timeout)
        if args.json:
            dump_json(env)
        else:
            human(env)
            for host, h in env["hosts"].items():
                if h["status"] == ERROR:
                    print(f"error: {host}: {h['error']}", file=sys.stderr)
        return exit_code(env)

    return run(_main)
