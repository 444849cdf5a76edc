"""tools/lab.py: the commands up, down, status and destroy, their options, messages and exit codes."""

from __future__ import annotations

import argparse
import enum
import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from rich.console import Console
from rich.table import Table

from .config import BRIDGE, Host, LabPaths, known_host_names, load_inventory, record_host, recorded_hosts
from .machines import STOP_WAIT_S, find_nspawn, start_host, stop_pid, teardown_host
from .network import ensure_bridge, ensure_host_link, ensure_nat, lab_bridges, link_exists, remove_network
from .rootfs import RootfsSpec, ensure_machine_root, ensure_rootfs
from .ssh import ensure_ssh_key, render_ssh_config, ssh_login, wait_for_ssh
from .system import LabError, ensure_sbin_on_path, locked, remove_tree, require_root, require_tools, write_file


class ExitCode(enum.IntEnum):
    OK = 0
    ERROR = 1
    DOWN = 3  # status --check: a host is not running or not reachable


SSH_WAIT_S = 90.0
STATUS_SCHEMA = 1
UP_TOOLS = ("systemd-nspawn", "ip", "iptables", "ssh", "ssh-keygen", "tar")
DOWN_TOOLS = ("ip",)


@dataclass(frozen=True)
class HostStatus:
    name: str
    ip: str
    running: bool
    pid: int | None
    ssh: bool


def cmd_up(args: argparse.Namespace, paths: LabPaths, console: Console) -> ExitCode:
    hosts = load_inventory(args.inventory)
    require_root("up")
    require_tools(UP_TOOLS)
    with locked(paths.lab / "lock", "tools/lab.py command"):
        for directory in (paths.run, paths.logs, paths.machines, paths.wheelhouse):
            directory.mkdir(parents=True, exist_ok=True)
        ensure_ssh_key(paths)
        for host in hosts:
            record_host(paths, host, args.inventory)
        write_file(paths.lab, "ssh_config", render_ssh_config(recorded_hosts(paths), paths.key))
        running = {h.name: find_nspawn(paths.machine(h.name), paths.pidfile(h.name)) for h in hosts}
        if args.fresh:
            _wipe_hosts(hosts, running, paths, console)
            running = dict.fromkeys(running)
        to_start = [h for h in hosts if running[h.name] is None]
        for segment in sorted({h.segment for h in hosts}):
            ensure_bridge(segment)
        ensure_nat(paths)
        started = _boot(to_start, hosts, paths, console) if to_start else {}
        for host in hosts:
            if running[host.name] is not None:
                console.print(f"{host.name}: already running (pid {running[host.name]}, {host.ip})")
        if to_start:
            console.print(f"{', '.join(h.name for h in to_start)}: booting, waiting for ssh (at most {args.timeout:g} s)…")
        booted = time.monotonic()
        wait_for_ssh(started, to_start, paths, args.timeout)
        took = time.monotonic() - booted
        for host in to_start:
            console.print(f"{host.name}: started (pid {started[host.name].pid}, {host.ip}), ssh ready after {took:.0f} s")
    return ExitCode.OK


def _wipe_hosts(hosts: Sequence[Host], running: Mapping[str, int | None], paths: LabPaths, console: Console) -> None:
    for host in hosts:
        pid = running[host.name]
        if pid is not None:
            stop_pid(pid)
            console.print(f"{host.name}: stopped (pid {pid}) for --fresh")
        teardown_host(host.name)
        if paths.machine(host.name).exists():
            remove_tree(paths.machine(host.name))
            console.print(f"{host.name}: wiped machine root")


def _boot(to_start: Sequence[Host], hosts: Sequence[Host], paths: LabPaths, console: Console) -> dict[str, subprocess.Popen[bytes]]:
    tarball = ensure_rootfs(RootfsSpec(), paths, console)
    fresh = [h.name for h in to_start if not paths.machine(h.name).is_dir()]
    if fresh:
        console.print(f"{', '.join(fresh)}: unpacking machine roots from {tarball.name}…")
    with ThreadPoolExecutor(max_workers=len(to_start)) as pool:  # unpacking is I/O, host keys are CPU
        created = list(pool.map(lambda host: ensure_machine_root(host, hosts, tarball, paths), to_start))
    started = {}
    for host, new in zip(to_start, created, strict=True):
        if new:
            console.print(f"{host.name}: created machine root {paths.machine(host.name)}")
        ensure_host_link(host)
        started[host.name] = start_host(host, paths)
    return started


def cmd_down(args: argparse.Namespace, paths: LabPaths, console: Console) -> ExitCode:
    names = known_host_names(args.inventory, paths)
    require_root("down")
    require_tools(DOWN_TOOLS)
    with locked(paths.lab / "lock", "tools/lab.py command"):
        changes = 0
        for name in names:
            changes += _down_host(name, paths, console)
        for what in remove_network(paths):
            console.print(f"network: removed {what}")
            changes += 1
        if not changes:
            console.print("lab: already down")
    return ExitCode.OK


def _down_host(name: str, paths: LabPaths, console: Console) -> int:
    changes = 0
    pid = find_nspawn(paths.machine(name), paths.pidfile(name))
    if pid is not None:
        killed = stop_pid(pid)
        console.print(f"{name}: stopped (pid {pid}{', killed after ' + str(int(STOP_WAIT_S)) + ' s' if killed else ''})")
        changes += 1
    for what in teardown_host(name):
        console.print(f"{name}: removed {what}")
        changes += 1
    paths.pidfile(name).unlink(missing_ok=True)
    (paths.run / f"{name}.json").unlink(missing_ok=True)
    return changes


def cmd_destroy(args: argparse.Namespace, paths: LabPaths, console: Console) -> ExitCode:
    """down, then remove the machine roots of this inventory's hosts (another inventory's stay)."""
    names = known_host_names(args.inventory, paths)  # before down forgets which hosts it booted
    cmd_down(args, paths, console)
    with locked(paths.lab / "lock", "tools/lab.py command"):
        for name in names:
            root = paths.machine(name)
            if root.exists():
                remove_tree(root)
                console.print(f"{name}: removed {root}")
        if paths.machines.is_dir() and not any(paths.machines.iterdir()):
            paths.machines.rmdir()
    return ExitCode.OK


def host_status(host: Host, paths: LabPaths) -> HostStatus:
    pid = find_nspawn(paths.machine(host.name), paths.pidfile(host.name))
    reachable = pid is not None and paths.ssh_config.exists() and ssh_login(host, paths, timeout=3)
    return HostStatus(host.name, str(host.ip), pid is not None, pid, reachable)


def cmd_status(args: argparse.Namespace, paths: LabPaths, console: Console) -> ExitCode:
    hosts = load_inventory(args.inventory)
    with ThreadPoolExecutor(max_workers=max(1, len(hosts))) as pool:
        rows = list(pool.map(lambda h: host_status(h, paths), hosts))
    down = [r.name for r in rows if not (r.running and r.ssh)]
    if args.json:
        doc = {"schema": STATUS_SCHEMA, "bridge": link_exists(BRIDGE), "bridges": lab_bridges(), "hosts": [vars(r) for r in rows]}
        print(json.dumps(doc, indent=2))
    elif args.check:
        if down:
            print(
                f"error: {', '.join(down)} {'is' if len(down) == 1 else 'are'} not running or not reachable over ssh: "
                f"start the lab with `make lab-up` (tools/lab.py up -i {args.inventory})",
                file=sys.stderr,
            )
        else:
            console.print(f"lab: {', '.join(r.name for r in rows)} running, ssh ready")
    else:
        table = Table("host", "running", "pid", "ip", "ssh", title="llmfleet lab")
        for r in rows:
            table.add_row(r.name, "yes" if r.running else "no", str(r.pid or "-"), r.ip, "yes" if r.ssh else "no")
        console.print(table)
    return ExitCode.DOWN if (args.check and down) else ExitCode.OK


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(ExitCode.ERROR)


def build_parser(paths: LabPaths) -> argparse.ArgumentParser:
    parser = _Parser(prog="tools/lab.py", description="Local systemd-nspawn fleet for llmfleet.")
    default_inventory = paths.repo / "inventory" / "lab" / "hosts.yml"
    common = _Parser(add_help=False)
    common.add_argument("-i", "--inventory", type=Path, default=default_inventory, help="inventory with a group 'lab'")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    up = sub.add_parser("up", parents=[common], help="build/reuse the rootfs and boot every lab host")
    up.add_argument("--fresh", action="store_true", help="wipe the hosts' machine roots first (destroys state)")
    up.add_argument("--timeout", type=float, default=SSH_WAIT_S, help="seconds to wait for sshd on each host")
    up.set_defaults(func=cmd_up)
    sub.add_parser("down", parents=[common], help="stop the hosts, remove their network").set_defaults(func=cmd_down)
    status = sub.add_parser("status", parents=[common], help="per host: running, pid, IP, ssh reachable")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("--check", action="store_true", help="exit 3 (naming the command that starts them) unless every host runs with ssh")
    status.set_defaults(func=cmd_status)
    destroy = sub.add_parser("destroy", parents=[common], help="down, then remove the machine roots of the inventory's hosts")
    destroy.set_defaults(func=cmd_destroy)
    return parser


def main(argv: Sequence[str] | None = None, paths: LabPaths | None = None) -> int:
    paths = paths or LabPaths.default()
    args = build_parser(paths).parse_args(argv)
    console = Console(highlight=False, markup=False, soft_wrap=True)
    ensure_sbin_on_path()
    try:
        return int(args.func(args, paths, console))
    except LabError as exc:
        print(f"error: {exc}", file=sys.stderr)
    except BrokenPipeError:  # the reader of our output left (`status --json | head`): nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except OSError as exc:  # an unexpected system failure is still one line, not a traceback
        print(f"error: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
    return ExitCode.ERROR
