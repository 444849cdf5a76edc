"""SSH to the lab hosts: the lab's key and ssh_config, and waiting until a booted host's sshd lets us in."""

from __future__ import annotations

import ipaddress
import re
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from .config import Host, LabPaths
from .system import LabError, run

LOG_TAIL_LINES = 25
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def render_ssh_config(hosts: Sequence[Host], key: Path) -> str:
    blocks = [
        "# Written by tools/lab.py up: ssh -F .lab/ssh_config lab1 (the lab inventories pass it to Ansible).\n"
        "# Lab hosts get fresh host keys at every boot: only here is host key checking off, and only for them\n"
        "# (by name and by address, which Ansible connects to)."
    ]
    for host in hosts:
        blocks.append(
            f"Host {host.name} {host.ip}\n"
            f"  HostName {host.ip}\n"
            "  User root\n"
            f"  IdentityFile {key}\n"
            "  IdentitiesOnly yes\n"
            "  StrictHostKeyChecking no\n"
            "  UserKnownHostsFile /dev/null\n"
            "  LogLevel ERROR\n"
            "  ConnectTimeout 5\n"
        )
    return "\n".join(blocks)


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no console log)"
    plain = (ANSI_ESCAPE.sub("", line).strip() for line in text.splitlines())
    tail = [line for line in plain if line][-lines:]
    return "\n".join("    " + line for line in tail) or "(console log is empty)"


def ensure_ssh_key(paths: LabPaths) -> None:
    if paths.key.is_file() and paths.key.with_suffix(".pub").is_file():
        return
    paths.key.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    paths.key.unlink(missing_ok=True)
    paths.key.with_suffix(".pub").unlink(missing_ok=True)
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "llmfleet-lab", "-f", str(paths.key)])
    paths.key.chmod(0o600)


def ssh_banner(ip: ipaddress.IPv4Address, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((str(ip), 22), timeout=timeout) as sock:
            return sock.recv(8).startswith(b"SSH-")
    except OSError:
        return False


def ssh_login(host: Host, paths: LabPaths, timeout: int = 5) -> bool:
    argv = ["ssh", "-F", str(paths.ssh_config), "-o", "BatchMode=yes", "-o", f"ConnectTimeout={timeout}", host.name, "true"]
    try:
        return subprocess.run(argv, capture_output=True, timeout=timeout + 5, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def wait_for_ssh(started: Mapping[str, subprocess.Popen[bytes]], hosts: Sequence[Host], paths: LabPaths, timeout: float) -> None:
    pending = {host.name: host for host in hosts}
    deadline = time.monotonic() + timeout
    while pending:
        for name, host in list(pending.items()):
            proc = started.get(name)
            if proc is not None and proc.poll() is not None:
                raise LabError(
                    f"{name}: systemd-nspawn exited with {proc.returncode} while booting; {paths.log(name)} ends:\n{_tail(paths.log(name))}"
                )
            if ssh_banner(host.ip) and ssh_login(host, paths):
                del pending[name]
        if pending and time.monotonic() > deadline:
            name = next(iter(pending))
            raise LabError(
                f"{name}: sshd at {pending[name].ip} did not answer within {timeout:g} s; "
                f"{paths.log(name)} ends:\n{_tail(paths.log(name))}\n(tools/lab.py down stops what did boot)"
            )
        if pending:
            time.sleep(0.25)
