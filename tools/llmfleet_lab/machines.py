"""The hosts' processes: systemd-nspawn booted in cgroups of its own (`llmfleet-lab/<host>`), found, stopped, and
what a stopped host leaves removed."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from .config import Host, LabPaths
from .network import remove_host_link
from .system import LabError

CGROUP_PARENT = "llmfleet-lab"
WHEELHOUSE_TARGET = "/srv/llmfleet/wheelhouse"
STOP_WAIT_S = 30.0
KILL_WAIT_S = 120  # a killed vLLM worker can take minutes to unmap its memory here


def nspawn_argv(host: Host, root: Path, wheelhouse: Path) -> list[str]:
    return [
        "systemd-nspawn",
        "--boot",
        "--register=no",
        "--keep-unit",
        f"--directory={root}",
        f"--machine={host.name}",
        f"--network-namespace-path=/run/netns/{host.netns}",
        "--capability=CAP_NET_ADMIN",  # the netns is the host's own; networkd needs it to set up host0 and lo
        "--resolv-conf=off",
        "--link-journal=no",
        "--console=read-only",
        f"--bind-ro={wheelhouse}:{WHEELHOUSE_TARGET}",
    ]


def parse_cgroup_mounts(mountinfo: str) -> dict[str, Path]:
    """Mount points of the hierarchies a container's systemd manages: cgroup2 (key "") and v1 name=systemd."""
    found: dict[str, Path] = {}
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        if tail[0] == "cgroup2":
            found.setdefault("", Path(fields[4]))
        elif tail[0] == "cgroup" and "name=systemd" in tail[2].split(","):
            found.setdefault("name=systemd", Path(fields[4]))
    return found


def parse_own_cgroups(proc_cgroup: str) -> dict[str, str]:
    """`/proc/self/cgroup` → {controller: path}; the cgroup2 line has the key ""."""
    own: dict[str, str] = {}
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            for controller in parts[1].split(","):
                own[controller] = parts[2]
    return own


def host_cgroups(host_name: str, mountinfo: str, proc_cgroup: str) -> list[Path]:
    """The host's own cgroups, below ours. Without them every nspawn here splits the same cgroup into
    /supervisor and /payload (no systemd on the machine, --keep-unit), so all containers share
    /payload and their systemds create and remove each other's unit cgroups (status 219/CGROUP)."""
    own = parse_own_cgroups(proc_cgroup)
    return [
        mount / own.get(key, "/").lstrip("/") / CGROUP_PARENT / host_name for key, mount in sorted(parse_cgroup_mounts(mountinfo).items())
    ]


def _proc_state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def _is_alive(pid: int) -> bool:
    state = _proc_state(pid)
    return state is not None and state not in ("Z", "X")


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def is_our_nspawn(argv: Sequence[str], root: Path) -> bool:
    return bool(argv) and os.path.basename(argv[0]) == "systemd-nspawn" and f"--directory={root}" in argv


def find_nspawn(root: Path, pidfile: Path) -> int | None:
    """PID of the nspawn running this machine root: the pidfile's if it checks out, else a scan."""
    with contextlib.suppress(OSError, ValueError):
        pid = int(pidfile.read_text().strip())
        if _is_alive(pid) and is_our_nspawn(_cmdline(pid), root):
            return pid
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and is_our_nspawn(_cmdline(int(entry.name)), root) and _is_alive(int(entry.name)):
            return int(entry.name)
    return None


def current_host_cgroups(host_name: str) -> list[Path]:
    return host_cgroups(host_name, Path("/proc/self/mountinfo").read_text(), Path("/proc/self/cgroup").read_text())


def remove_host_cgroups(host_name: str) -> list[str]:
    """Kill what is left in the host's cgroups (it can only be the container's), then remove them."""
    removed = []
    for cgroup in current_host_cgroups(host_name):
        if not cgroup.is_dir():
            continue
        tree = sorted((d for d in cgroup.rglob("*") if d.is_dir()), key=lambda d: len(d.parts), reverse=True)
        for directory in [*tree, cgroup]:
            _remove_cgroup(directory)
        removed.append(f"cgroup {cgroup}")
        with contextlib.suppress(OSError):  # the shared parent goes with the last host
            cgroup.parent.rmdir()
    return removed


def _remove_cgroup(cgroup: Path) -> None:
    """Empty and remove one cgroup. rmdir answers EBUSY while killed tasks are still exiting."""
    deadline = time.monotonic() + KILL_WAIT_S
    while True:
        _empty_cgroup(cgroup)
        try:
            cgroup.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                raise LabError(f"{cgroup}: cannot be removed ({exc.strerror}); remove it by hand") from exc
            time.sleep(0.1)


def _cgroup_pids(cgroup: Path) -> list[str]:
    """The processes of a cgroup; none when the cgroup is gone (the container's systemd removes its own
    cgroups while it halts, racing this cleanup)."""
    try:
        return (cgroup / "cgroup.procs").read_text().split()
    except FileNotFoundError:
        return []


def _empty_cgroup(cgroup: Path) -> None:
    deadline = time.monotonic() + KILL_WAIT_S
    while pids := _cgroup_pids(cgroup):
        if time.monotonic() > deadline:
            raise LabError(f"{cgroup}: processes {' '.join(pids)} survived SIGKILL; remove the cgroup by hand")
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        time.sleep(0.1)


def _enter_cgroups(cgroups: Sequence[Path]) -> Callable[[], None]:
    def enter() -> None:  # runs in the child between fork and exec
        for cgroup in cgroups:
            (cgroup / "cgroup.procs").write_text(str(os.getpid()))

    return enter


def start_host(host: Host, paths: LabPaths) -> subprocess.Popen[bytes]:
    remove_host_cgroups(host.name)  # stale ones of an unclean stop
    cgroups = current_host_cgroups(host.name)
    for cgroup in cgroups:
        cgroup.mkdir(parents=True)
    with open(paths.log(host.name), "ab") as log:
        log.write(f"\n--- llmfleet lab: booting {host.name} at {time.strftime('%F %T')} ---\n".encode())
        log.flush()
        proc = subprocess.Popen(
            nspawn_argv(host, paths.machine(host.name), paths.wheelhouse),
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, close_fds=True, preexec_fn=_enter_cgroups(cgroups),
        )  # fmt: skip
    paths.pidfile(host.name).write_text(f"{proc.pid}\n")
    return proc


def stop_pid(pid: int) -> bool:
    """SIGTERM (the container's systemd halts), SIGKILL after STOP_WAIT_S; True if it had to kill."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if _wait_gone(pid, STOP_WAIT_S):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    _wait_gone(pid, KILL_WAIT_S)
    return True


def _wait_gone(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reap it if it happens to be our child
        if not _is_alive(pid):
            return True
        time.sleep(0.1)
    return not _is_alive(pid)


def teardown_host(host_name: str) -> list[str]:
    """What a stopped host leaves: its cgroups, veth and network namespace."""
    return remove_host_cgroups(host_name) + remove_host_link(host_name)
