"""The lab: a small fleet of systemd-nspawn hosts on the control node.

`up` builds (or reuses) a cached Debian rootfs tarball, unpacks one machine root per host of the
inventory group `lab`, wires each host into its own network namespace `llmf-<host>` with a veth on
the bridge of its segment (`llmf<N>` for 10.213.<N>.0/24, the control node at .1, NAT to the default
route; a site's hosts share a segment) and boots it with a real systemd. `down` stops the hosts and
removes exactly what `up` created; `status` reports; `destroy` is `down` plus removing the machine roots.

Everything the lab creates is recognisable as its own: machine roots under `<lab>/machines` (`<lab>`
is `$LLMFLEET_LAB_DIR`, else `<repo>/.lab`), network namespaces `llmf-<host>`, veths `lfv-<host>`,
cgroups `llmfleet-lab/<host>`, bridges `llmf<N>` and iptables rules that carry the comment
`llmfleet-lab`. Teardown touches nothing else.
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import errno
import fcntl
import hashlib
import ipaddress
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import yaml
from rich.console import Console
from rich.table import Table


class ExitCode(enum.IntEnum):
    OK = 0
    ERROR = 1
    DOWN = 3  # status --check: a host is not running or not reachable


class LabError(Exception):
    """A failure reported as a clear message, never as a traceback."""


# --- constants of the lab contract (docs/architecture.md, "Lab network") ----------------------

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
SECURITY_MIRROR = "http://deb.debian.org/debian-security"
PACKAGES = (
    "systemd", "systemd-sysv", "dbus", "openssh-server", "python3", "python3-venv",
    "python3-apt", "libnuma1", "ca-certificates", "iproute2", "procps", "sudo", "less", "curl",
    "iputils-ping",
    "g++", "python3-dev",  # vLLM's CPU build compiles kernels at start-up (tensor parallel needs it)
    "man-db",  # `systemd-analyze verify` runs `man` for each Documentation=man: of a unit
    "nginx-light",  # a site's mirror (roles/site_mirror) on a lab host; a site without a WAN cannot apt
)  # fmt: skip
# Bump whenever build_rootfs/_prepare_rootfs changes what ends up in the tarball.
ROOTFS_BUILDER_VERSION = 6
# Units masked in the tarball. console-getty: nobody logs in on the console log. The apt and man-db
# timers would run apt/mandb at random times, racing tests for the dpkg lock and the two cores.
MASKED_UNITS = (
    "console-getty.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "man-db.timer",
)
# Documentation and translations are left out of the tarball and of later installs (dpkg path-exclude);
# man pages stay: `systemd-analyze verify` checks that a unit's man: documentation resolves.
DPKG_EXCLUDES = (
    "path-exclude /usr/share/doc/*",
    "path-include /usr/share/doc/*/copyright",
    "path-exclude /usr/share/info/*",
    "path-exclude /usr/share/locale/*",
    "path-include /usr/share/locale/locale.alias",
)

#: every lab address; each /24 of it is one segment (a site's LAN) with a bridge of its own,
#: llmf<N> for 10.213.<N>.0/24, whose .1 is the control node. Traffic between the control node and a
#: segment crosses that bridge only: the segment's "WAN" link, whose bytes iptables can count.
LAB_RANGE = ipaddress.IPv4Network("10.213.0.0/16")
NETWORK = ipaddress.IPv4Network("10.213.0.0/24")  # the default segment (inventory/lab)
GATEWAY = ipaddress.IPv4Address("10.213.0.1")
BRIDGE = "llmf0"
BRIDGE_PREFIX = "llmf"
NETNS_PREFIX = "llmf-"
VETH_PREFIX = "lfv-"
CONTAINER_IF = "host0"
RULE_COMMENT = "llmfleet-lab"
CGROUP_PARENT = "llmfleet-lab"
WHEELHOUSE_TARGET = "/srv/llmfleet/wheelhouse"
NETWORK_FILE = "etc/systemd/network/10-llmfleet-lab.network"
HOST_NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,10}$")  # netns/veth names: 15 characters at most
SSH_WAIT_S = 90.0
STOP_WAIT_S = 30.0
KILL_WAIT_S = 120  # a killed vLLM worker can take minutes to unmap its memory here
LOG_TAIL_LINES = 25
STATUS_SCHEMA = 1
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")

TOOL_PACKAGES = {
    "systemd-nspawn": "systemd-container",
    "debootstrap": "debootstrap",
    "ip": "iproute2",
    "iptables": "iptables",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "tar": "tar",
}
UP_TOOLS = ("systemd-nspawn", "ip", "iptables", "ssh", "ssh-keygen", "tar")
DOWN_TOOLS = ("ip",)


# --- pure parts: inventory, cache key, rendered files ------------------------------------------


@dataclass(frozen=True)
class Host:
    name: str
    ip: ipaddress.IPv4Address

    @property
    def segment(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(f"{self.ip}/24", strict=False)

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        return segment_gateway(self.segment)

    @property
    def bridge(self) -> str:
        return segment_bridge(self.segment)

    @property
    def netns(self) -> str:
        return NETNS_PREFIX + self.name

    @property
    def veth(self) -> str:
        return VETH_PREFIX + self.name


def segment_bridge(segment: ipaddress.IPv4Network) -> str:
    return f"{BRIDGE_PREFIX}{segment.network_address.packed[2]}"


def segment_gateway(segment: ipaddress.IPv4Network) -> ipaddress.IPv4Address:
    return segment.network_address + 1


def parse_inventory(data: Any, source: str) -> list[Host]:
    """Hosts of the group `lab` (under `all.children.lab.hosts` or `lab.hosts`), validated."""
    raw = _lab_group_hosts(data, source)
    hosts = [_parse_host(name, hvars, source) for name, hvars in raw.items()]
    if not hosts:
        raise LabError(f"{source}: group 'lab' has no hosts")
    _refuse_duplicate_ips(hosts, source)
    return hosts


def _lab_group_hosts(data: Any, source: str) -> Mapping[str, Any]:
    candidates = [_get(data, "all", "children", "lab"), _get(data, "lab")]
    for group in candidates:
        hosts = _get(group, "hosts")
        if isinstance(hosts, Mapping):
            return hosts
    raise LabError(f"{source}: no group 'lab' with hosts (expected all.children.lab.hosts or lab.hosts)")


def _get(data: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(data, Mapping):
            return None
        data = data.get(key)
    return data


def _parse_host(name: Any, hvars: Any, source: str) -> Host:
    if not isinstance(name, str) or not HOST_NAME_RE.match(name):
        raise LabError(f"{source}: host {name!r}: name must match {HOST_NAME_RE.pattern} (it names a network namespace and a veth)")
    address = hvars.get("ansible_host") if isinstance(hvars, Mapping) else None
    if address is None:
        raise LabError(f"{source}: host {name}: ansible_host is missing (its IP in {LAB_RANGE}, e.g. 10.213.0.11)")
    try:
        ip = ipaddress.IPv4Address(str(address))
    except ValueError:
        raise LabError(f"{source}: host {name}: ansible_host {address!r} is not an IPv4 address") from None
    host = Host(name, ip)
    reserved = {host.segment.network_address, host.segment.broadcast_address, host.gateway}
    if ip not in LAB_RANGE or ip in reserved:
        raise LabError(
            f"{source}: host {name}: ansible_host {ip} must be in {LAB_RANGE}, other than a segment's .1 "
            f"(the control node on bridge {BRIDGE_PREFIX}<N>) and its network/broadcast addresses"
        )
    return host


def _refuse_duplicate_ips(hosts: Sequence[Host], source: str) -> None:
    seen: dict[ipaddress.IPv4Address, str] = {}
    for host in hosts:
        if host.ip in seen:
            raise LabError(f"{source}: hosts {seen[host.ip]} and {host.name} share ansible_host {host.ip}")
        seen[host.ip] = host.name


def load_inventory(path: Path) -> list[Host]:
    """Lab hosts of a YAML inventory file, or of `<dir>/hosts.yml` for an inventory directory."""
    if path.is_dir():
        path = path / "hosts.yml"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LabError(f"inventory {path} not found: pass -i PATH to a YAML inventory with a group 'lab'") from None
    except OSError as exc:
        raise LabError(f"inventory {path}: cannot read it ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise LabError(f"inventory {path}: not valid YAML ({_one_line(str(exc))})") from None
    return parse_inventory(data, str(path))


@dataclass(frozen=True)
class RootfsSpec:
    suite: str = SUITE
    mirror: str = MIRROR
    packages: tuple[str, ...] = PACKAGES
    builder: int = ROOTFS_BUILDER_VERSION

    def key(self) -> str:
        """Content key of the tarball: the same inputs give the same key, in any package order."""
        doc = {
            "suite": self.suite,
            "mirror": self.mirror,
            "packages": sorted(set(self.packages)),
            "builder": self.builder,
        }
        canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def tarball(self, cache: Path) -> Path:
        return cache / "rootfs" / f"{self.suite}-{self.key()}.tar"


def render_network(ip: ipaddress.IPv4Address, nameservers: Sequence[str]) -> str:
    segment = ipaddress.IPv4Network(f"{ip}/24", strict=False)
    lines = [
        "# Written by llmfleet lab (tools/lab.py): static address on the lab bridge.",
        "[Match]",
        f"Name={CONTAINER_IF}",
        "",
        "[Network]",
        f"Address={ip}/{segment.prefixlen}",
        f"Gateway={segment_gateway(segment)}",
        *(f"DNS={ns}" for ns in nameservers),
        "LinkLocalAddressing=no",
        "IPv6AcceptRA=no",
    ]
    return "\n".join(lines) + "\n"


def render_hosts(hosts: Sequence[Host]) -> str:
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    lines += [f"{host.ip}\t{host.name}" for host in hosts]
    return "\n".join(lines) + "\n"


def render_resolv(nameservers: Sequence[str]) -> str:
    return "".join(f"nameserver {ns}\n" for ns in nameservers)


def parse_nameservers(text: str) -> list[str]:
    """IPv4/IPv6 nameservers of a resolv.conf, loopback ones left out (unusable inside a host)."""
    found: list[str] = []
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) < 2 or fields[0] != "nameserver":
            continue
        try:
            address = ipaddress.ip_address(fields[1])
        except ValueError:
            continue
        if not address.is_loopback and str(address) not in found:
            found.append(str(address))
    return found


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


def nat_rules(out_interface: str) -> list[tuple[str, list[str]]]:
    """(table, rule) pairs: masquerade the lab's addresses out of the uplink, let them be forwarded."""
    net = str(LAB_RANGE)
    tag = ["-m", "comment", "--comment", RULE_COMMENT]
    return [
        ("nat", ["POSTROUTING", "-s", net, "!", "-d", net, "-o", out_interface, *tag, "-j", "MASQUERADE"]),
        ("filter", ["FORWARD", "-s", net, *tag, "-j", "ACCEPT"]),
        ("filter", ["FORWARD", "-d", net, "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", *tag, "-j", "ACCEPT"]),
    ]  # fmt: skip


def owned_rule_deletions(listing: str) -> list[list[str]]:
    """`iptables -S CHAIN` output → the `-D` arguments of each rule tagged as the lab's."""
    deletions = []
    for line in listing.splitlines():
        args = shlex.split(line)
        if len(args) > 2 and args[0] == "-A" and _has_comment(args, RULE_COMMENT):
            deletions.append(["-D", *args[1:]])
    return deletions


def _has_comment(args: Sequence[str], comment: str) -> bool:
    return any(a == "--comment" and b == comment for a, b in itertools.pairwise(args))


def missing_tools(names: Sequence[str], which: Callable[[str], str | None] | None = None) -> list[str]:
    lookup = which or shutil.which
    return [name for name in names if lookup(name) is None]


def missing_tools_message(missing: Sequence[str]) -> str:
    packages = sorted({TOOL_PACKAGES.get(name, name) for name in missing})
    return f"{', '.join(missing)} not found: apt-get install {' '.join(packages)}"


def require_tools(names: Sequence[str], which: Callable[[str], str | None] | None = None) -> None:
    missing = missing_tools(names, which)
    if missing:
        raise LabError(missing_tools_message(missing))


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


def _one_line(text: str) -> str:
    return " ".join(text.split())


# --- paths and small helpers -------------------------------------------------------------------


@dataclass(frozen=True)
class LabPaths:
    repo: Path
    cache: Path

    @classmethod
    def default(cls) -> LabPaths:
        cache = os.environ.get("LLMFLEET_CACHE") or str(Path.home() / ".cache" / "llmfleet")
        return cls(repo=Path(__file__).resolve().parents[2], cache=Path(cache).absolute())

    @property
    def lab(self) -> Path:
        """``$LLMFLEET_LAB_DIR`` (what the inventories and the Makefile read), else ``<repo>/.lab``: one
        folder for the hosts, their keys and their state, whichever checkout runs the command."""
        chosen = os.environ.get("LLMFLEET_LAB_DIR")
        return Path(chosen).absolute() if chosen else self.repo / ".lab"

    @property
    def machines(self) -> Path:
        return self.lab / "machines"

    @property
    def logs(self) -> Path:
        return self.lab / "logs"

    @property
    def run(self) -> Path:
        return self.lab / "run"

    @property
    def key(self) -> Path:
        return self.lab / "ssh" / "id_ed25519"

    @property
    def ssh_config(self) -> Path:
        return self.lab / "ssh_config"

    @property
    def wheelhouse(self) -> Path:
        return self.cache / "wheelhouse"

    def machine(self, host: str) -> Path:
        return self.machines / host

    def log(self, host: str) -> Path:
        return self.logs / f"{host}.log"

    def pidfile(self, host: str) -> Path:
        return self.run / f"{host}.pid"


def run(
    argv: Sequence[str], *, check: bool = True, stdout: Any = subprocess.PIPE, pass_fds: Sequence[int] = ()
) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(list(argv), text=True, stdout=stdout, stderr=subprocess.PIPE, check=False, pass_fds=pass_fds)
    except FileNotFoundError:
        raise LabError(missing_tools_message([argv[0]])) from None
    if check and proc.returncode != 0:
        detail = _one_line(proc.stderr or "")[-300:] or "no error output"
        raise LabError(f"`{shlex.join(argv)}` failed (exit {proc.returncode}): {detail}")
    return proc


def _ensure_sbin_on_path() -> None:
    parts = os.environ.get("PATH", "").split(os.pathsep)
    extra = [d for d in ("/usr/local/sbin", "/usr/sbin", "/sbin") if d not in parts]
    os.environ["PATH"] = os.pathsep.join([*parts, *extra])


def _require_root(command: str) -> None:
    if os.geteuid() != 0:
        raise LabError(f"`lab {command}` needs root (systemd-nspawn, network namespaces, iptables): run it as root")


@contextlib.contextmanager
def _locked(path: Path, what: str) -> Iterator[int]:
    """Hold an exclusive lock on path (its fd is yielded: a child given it keeps the lock while it lives)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LabError(f"{path} is held by another {what}: wait for it to finish") from None
        yield handle.fileno()


def write_file(root: Path, relative: str, content: str, mode: int = 0o644) -> bool:
    """Write root/relative atomically, refusing symlinked parents; True if the content changed."""
    target = root / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.parent.resolve() != root.resolve() / Path(relative).parent:
        raise LabError(f"{target.parent} is (under) a symlink: refusing to write through it")
    if target.is_file() and not target.is_symlink() and target.read_text() == content:
        return False
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    with os.fdopen(fd, "w") as handle:
        handle.write(content)
    os.chmod(tmp, mode)
    os.replace(tmp, target)
    return True


def _umount_under(path: Path) -> None:
    prefix = str(path.resolve())
    mounts = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point == prefix or point.startswith(prefix + "/"):
            mounts.append(point)
    for point in sorted(mounts, key=len, reverse=True):
        run(["umount", "--lazy", point], check=False)


def _remove_tree(path: Path) -> None:
    if path.exists() or path.is_symlink():
        _umount_under(path)
        shutil.rmtree(path)


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no console log)"
    plain = (ANSI_ESCAPE.sub("", line).strip() for line in text.splitlines())
    tail = [line for line in plain if line][-lines:]
    return "\n".join("    " + line for line in tail) or "(console log is empty)"


# --- rootfs cache --------------------------------------------------------------------------------


def ensure_rootfs(spec: RootfsSpec, paths: LabPaths, console: Console) -> Path:
    tarball = spec.tarball(paths.cache)
    if tarball.is_file():
        return tarball
    require_tools(["debootstrap", "tar"])
    with _locked(tarball.parent / ".lock", "rootfs build") as lock_fd:
        if not tarball.is_file():  # another build may have finished while we waited
            _build_rootfs(spec, tarball, lock_fd, console)
    return tarball


def _build_rootfs(spec: RootfsSpec, tarball: Path, lock_fd: int, console: Console) -> None:
    for stale in tarball.parent.glob(".build-*"):  # we hold the lock: any build dir is a dead one
        _remove_tree(stale)
    work = Path(tempfile.mkdtemp(prefix=f".build-{spec.key()}-", dir=tarball.parent))
    log = tarball.with_suffix(".build.log")
    started = time.monotonic()
    try:
        root = work / "root"
        if not console.is_terminal:  # a log (make lab under CI) gets a line; a terminal the spinner below
            console.print(f"rootfs: debootstrap {spec.suite} into {tarball.name} (about a minute; log {log})…")
        with console.status(f"rootfs: debootstrap {spec.suite} (about a minute)…"):
            _debootstrap(spec, root, log, lock_fd)
            _prepare_rootfs(root, spec)
            partial = work / "rootfs.tar"
            run(["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-C", str(root), "-cf", str(partial), "."])
        os.replace(partial, tarball)  # atomic: a killed build never leaves a finished-looking tarball
    finally:
        _remove_tree(work)
    size = tarball.stat().st_size / 2**20
    console.print(f"rootfs: built {tarball} ({size:.0f} MiB) in {time.monotonic() - started:.0f} s")


def _debootstrap(spec: RootfsSpec, root: Path, log: Path, lock_fd: int) -> None:
    """debootstrap inherits the build lock: were we killed, it still guards the build dir until it exits."""
    argv = [
        "debootstrap", "--variant=minbase", f"--include={','.join(sorted(set(spec.packages)))}",
        spec.suite, str(root), spec.mirror,
    ]  # fmt: skip
    inherited = fcntl.fcntl(lock_fd, fcntl.F_DUPFD_CLOEXEC, 100)  # debootstrap reuses fds 3 and 4 itself
    try:
        with open(log, "w") as handle:
            proc = run(argv, check=False, stdout=handle, pass_fds=[inherited])
    finally:
        os.close(inherited)
    if proc.returncode != 0:
        last = _one_line(proc.stderr)[-200:] or "see the log"
        raise LabError(f"debootstrap failed (exit {proc.returncode}): {last}; log: {log}")


def _prepare_rootfs(root: Path, spec: RootfsSpec) -> None:
    """Host-independent setup baked into the tarball: apt sources, enabled units, no identity."""
    (root / "etc/apt/sources.list").unlink(missing_ok=True)
    write_file(root, "etc/apt/sources.list.d/debian.sources", _apt_sources(spec))
    run(["chroot", str(root), "systemctl", "enable", "systemd-networkd.service", "ssh.service"])
    # installed for the hosts that serve a site's mirror; roles/site_mirror enables it there
    run(["chroot", str(root), "systemctl", "disable", "nginx.service"])
    for unit in MASKED_UNITS:
        _mask(root, unit)
    write_file(root, "etc/default/locale", "LANG=C.UTF-8\n")
    _slim(root)
    _strip_identity(root)
    _strip_apt_caches(root)


def _apt_sources(spec: RootfsSpec) -> str:
    return (
        f"Types: deb\nURIs: {spec.mirror}\nSuites: {spec.suite} {spec.suite}-updates\nComponents: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
        f"Types: deb\nURIs: {SECURITY_MIRROR}\nSuites: {spec.suite}-security\nComponents: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
    )


def _mask(root: Path, unit: str) -> None:
    link = root / "etc/systemd/system" / unit
    link.unlink(missing_ok=True)
    link.symlink_to("/dev/null")


def _slim(root: Path) -> None:
    write_file(root, "etc/dpkg/dpkg.cfg.d/llmfleet-slim", "\n".join(DPKG_EXCLUDES) + "\n")
    keep = {"copyright", "locale.alias"}
    for top in ("usr/share/doc", "usr/share/info", "usr/share/locale"):
        for path in sorted((root / top).rglob("*"), reverse=True):  # children before their directory
            if path.is_symlink() or path.is_file():
                if path.name not in keep:
                    path.unlink()
            elif path.is_dir() and not any(path.iterdir()):
                path.rmdir()


def _strip_identity(root: Path) -> None:
    (root / "etc/machine-id").write_text("")
    dbus_id = root / "var/lib/dbus/machine-id"
    if dbus_id.exists() and not dbus_id.is_symlink():
        dbus_id.unlink()
        dbus_id.symlink_to("/etc/machine-id")
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    for name in ("etc/hostname", "etc/resolv.conf"):
        (root / name).unlink(missing_ok=True)


def _strip_apt_caches(root: Path) -> None:
    for pattern in ("var/cache/apt/archives/*.deb", "var/cache/apt/*.bin", "var/lib/apt/lists/*_*"):
        for path in root.glob(pattern):
            path.unlink()


# --- machine roots -------------------------------------------------------------------------------


def ensure_machine_root(host: Host, hosts: Sequence[Host], tarball: Path, paths: LabPaths) -> bool:
    """Unpack the host's root if missing (True), then refresh the files the lab owns inside it."""
    root = paths.machine(host.name)
    created = False
    if not root.is_dir():
        _unpack_machine_root(host, tarball, paths)
        created = True
    _write_lab_files(root, host, hosts, paths)
    return created


def _unpack_machine_root(host: Host, tarball: Path, paths: LabPaths) -> None:
    paths.machines.mkdir(parents=True, exist_ok=True)
    staging = paths.machines / f".{host.name}.new"
    _remove_tree(staging)
    staging.mkdir(mode=0o755)
    run(["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-C", str(staging), "-xpf", str(tarball)])
    write_file(staging, "etc/machine-id", uuid.uuid4().hex + "\n", 0o444)
    run(["ssh-keygen", "-q", "-A", "-f", str(staging)])
    _trust_local_cas(staging)
    staging.rename(paths.machine(host.name))  # only a finished root gets the host's name


def _trust_local_cas(root: Path) -> None:
    """Trust the control node's local CAs too (a TLS-intercepting proxy between the lab and PyPI: docs/architecture.md, "Lab network")."""
    local = sorted(Path("/usr/local/share/ca-certificates").glob("*.crt"))
    bundle = root / "etc/ssl/certs/ca-certificates.crt"
    if not local or bundle.is_symlink() or not bundle.is_file():  # never append through a link to the host
        return
    pems = []
    for cert in local:
        text = cert.read_text()
        write_file(root, f"usr/local/share/ca-certificates/{cert.name}", text)
        pems.append(text if text.endswith("\n") else text + "\n")
    with open(bundle, "a") as handle:
        handle.writelines(pems)


def _write_lab_files(root: Path, host: Host, hosts: Sequence[Host], paths: LabPaths) -> None:
    nameservers = host_nameservers()
    write_file(root, "etc/hostname", host.name + "\n")
    write_file(root, "etc/hosts", render_hosts(hosts))
    write_file(root, "etc/resolv.conf", render_resolv(nameservers))
    write_file(root, NETWORK_FILE, render_network(host.ip, nameservers))
    (root / "root/.ssh").mkdir(mode=0o700, parents=True, exist_ok=True)
    write_file(root, "root/.ssh/authorized_keys", paths.key.with_suffix(".pub").read_text(), 0o600)


def host_nameservers() -> list[str]:
    for source in (Path("/etc/resolv.conf"), Path("/run/systemd/resolve/resolv.conf")):
        with contextlib.suppress(OSError):
            found = parse_nameservers(source.read_text())
            if found:
                return found
    raise LabError("no usable nameserver in /etc/resolv.conf (loopback ones do not work inside a lab host)")


def ensure_ssh_key(paths: LabPaths) -> None:
    if paths.key.is_file() and paths.key.with_suffix(".pub").is_file():
        return
    paths.key.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    paths.key.unlink(missing_ok=True)
    paths.key.with_suffix(".pub").unlink(missing_ok=True)
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "llmfleet-lab", "-f", str(paths.key)])
    paths.key.chmod(0o600)


# --- network -------------------------------------------------------------------------------------


def _link_exists(name: str, netns: str | None = None) -> bool:
    argv = ["ip", *(["-n", netns] if netns else []), "link", "show", "dev", name]
    return run(argv, check=False).returncode == 0


def _netns_exists(name: str) -> bool:
    return Path("/run/netns", name).exists()


def ensure_bridge(segment: ipaddress.IPv4Network = NETWORK) -> None:
    bridge = segment_bridge(segment)
    if not _link_exists(bridge):
        run(["ip", "link", "add", bridge, "type", "bridge"])
    run(["ip", "addr", "replace", f"{segment_gateway(segment)}/{segment.prefixlen}", "dev", bridge])
    run(["ip", "link", "set", bridge, "up"])


def default_route_interface() -> str:
    routes = json.loads(run(["ip", "-j", "-4", "route", "show", "default"]).stdout or "[]")
    for route in routes:
        if route.get("dev"):
            return str(route["dev"])
    raise LabError("no IPv4 default route on this machine: the lab NATs its hosts out of it")


def ensure_nat(paths: LabPaths) -> None:
    forward = Path("/proc/sys/net/ipv4/ip_forward")
    if forward.read_text().strip() != "1":
        saved = paths.run / "ip_forward.orig"
        if not saved.exists():
            saved.write_text(forward.read_text())
        forward.write_text("1\n")
    for table, rule in nat_rules(default_route_interface()):
        if run(["iptables", "-w", "-t", table, "-C", *rule], check=False).returncode != 0:
            chain, spec = rule[0], rule[1:]
            verb = ["-A", chain] if table == "nat" else ["-I", chain, "1"]
            run(["iptables", "-w", "-t", table, *verb, *spec])


def remove_nat(paths: LabPaths) -> list[str]:
    removed = []
    if shutil.which("iptables"):
        for table, chain in (("nat", "POSTROUTING"), ("filter", "FORWARD")):
            listing = run(["iptables", "-w", "-t", table, "-S", chain], check=False).stdout
            for deletion in owned_rule_deletions(listing):
                run(["iptables", "-w", "-t", table, *deletion])
                removed.append(f"iptables {table} {chain} rule")
    saved = paths.run / "ip_forward.orig"
    if saved.exists():
        Path("/proc/sys/net/ipv4/ip_forward").write_text(saved.read_text())
        saved.unlink()
        removed.append("ip_forward setting (restored)")
    return removed


def ensure_host_link(host: Host) -> None:
    if not _netns_exists(host.netns):
        run(["ip", "netns", "add", host.netns])
    if _link_exists(host.veth) and not _link_exists(CONTAINER_IF, host.netns):
        run(["ip", "link", "del", host.veth])  # half a pair: start over
    if not _link_exists(host.veth):
        run(["ip", "link", "add", host.veth, "type", "veth", "peer", "name", CONTAINER_IF, "netns", host.netns])
    run(["ip", "link", "set", host.veth, "master", host.bridge, "up"])


def teardown_host(host_name: str) -> list[str]:
    """What a stopped host leaves: its cgroups, veth and network namespace."""
    return remove_host_cgroups(host_name) + remove_host_link(host_name)


def remove_host_link(host_name: str) -> list[str]:
    removed = []
    veth, netns = VETH_PREFIX + host_name, NETNS_PREFIX + host_name
    if _link_exists(veth):
        run(["ip", "link", "del", veth])
        removed.append(f"veth {veth}")
    if _netns_exists(netns):
        _kill_netns_leftovers(netns)
        run(["ip", "netns", "del", netns])
        removed.append(f"netns {netns}")
    return removed


def _kill_netns_leftovers(netns: str) -> None:
    """Processes still inside one of our namespaces after nspawn exited are the container's."""
    pids = run(["ip", "netns", "pids", netns], check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


# --- container processes -------------------------------------------------------------------------


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


# --- ssh -----------------------------------------------------------------------------------------


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


# --- commands ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HostStatus:
    name: str
    ip: str
    running: bool
    pid: int | None
    ssh: bool


def cmd_up(args: argparse.Namespace, paths: LabPaths, console: Console) -> ExitCode:
    hosts = load_inventory(args.inventory)
    _require_root("up")
    require_tools(UP_TOOLS)
    with _locked(paths.lab / "lock", "tools/lab.py command"):
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
            _remove_tree(paths.machine(host.name))
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
    names = _known_host_names(args.inventory, paths)
    _require_root("down")
    require_tools(DOWN_TOOLS)
    with _locked(paths.lab / "lock", "tools/lab.py command"):
        changes = 0
        for name in names:
            changes += _down_host(name, paths, console)
        for what in _remove_network(paths):
            console.print(f"network: removed {what}")
            changes += 1
        if not changes:
            console.print("lab: already down")
    return ExitCode.OK


def _known_host_names(inventory: Path, paths: LabPaths) -> list[str]:
    """Hosts of the inventory plus those this inventory booted earlier (it may have changed since).

    Hosts booted from another inventory (the lab fleet beside the two-host lab, a molecule scenario)
    are left alone: several inventories share one lab.
    """
    names = [host.name for host in load_inventory(inventory)] if inventory.exists() else []
    if paths.run.is_dir():
        owner = str(inventory.absolute())
        for pidfile in sorted(paths.run.glob("*.pid")):
            record = _read_record(paths, pidfile.stem)
            if pidfile.stem not in names and record.get("inventory", owner) == owner:
                names.append(pidfile.stem)
    return names


def record_host(paths: LabPaths, host: Host, inventory: Path) -> None:
    """Remember which inventory booted a host and its address (ssh_config covers every booted host)."""
    doc = {"inventory": str(inventory.absolute()), "ip": str(host.ip)}
    write_file(paths.run, f"{host.name}.json", json.dumps(doc, sort_keys=True) + "\n")


def _read_record(paths: LabPaths, name: str) -> dict[str, Any]:
    try:
        doc = json.loads((paths.run / f"{name}.json").read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def recorded_hosts(paths: LabPaths) -> list[Host]:
    hosts = []
    for record in sorted(paths.run.glob("*.json")) if paths.run.is_dir() else []:
        with contextlib.suppress(KeyError, ValueError):
            hosts.append(Host(record.stem, ipaddress.IPv4Address(_read_record(paths, record.stem)["ip"])))
    return hosts


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


def _bridge_ports(bridge: str) -> list[str]:
    links = json.loads(run(["ip", "-j", "link", "show", "master", bridge], check=False).stdout or "[]")
    return [str(link.get("ifname")) for link in links]


def lab_bridges() -> list[str]:
    """The lab's bridges on this machine (llmf<N>)."""
    links = json.loads(run(["ip", "-j", "link", "show", "type", "bridge"], check=False).stdout or "[]")
    names = [str(link.get("ifname")) for link in links]
    return sorted(n for n in names if re.fullmatch(BRIDGE_PREFIX + r"\d{1,3}", n))


def _remove_network(paths: LabPaths) -> list[str]:
    """A bridge goes when its last host does; NAT with the last bridge (other inventories' hosts may
    still use them)."""
    removed = []
    for bridge in lab_bridges():
        if not _bridge_ports(bridge):
            run(["ip", "link", "del", bridge])
            removed.append(f"bridge {bridge}")
    if lab_bridges():
        return removed
    return removed + remove_nat(paths)


def cmd_destroy(args: argparse.Namespace, paths: LabPaths, console: Console) -> ExitCode:
    cmd_down(args, paths, console)
    with _locked(paths.lab / "lock", "tools/lab.py command"):
        if paths.machines.exists():
            _remove_tree(paths.machines)
            console.print(f"lab: removed {paths.machines}")
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
        doc = {"schema": STATUS_SCHEMA, "bridge": _link_exists(BRIDGE), "bridges": lab_bridges(), "hosts": [vars(r) for r in rows]}
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


# --- entry point ---------------------------------------------------------------------------------


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
    destroy = sub.add_parser("destroy", parents=[common], help="down, then remove .lab/machines")
    destroy.set_defaults(func=cmd_destroy)
    return parser


def main(argv: Sequence[str] | None = None, paths: LabPaths | None = None) -> int:
    paths = paths or LabPaths.default()
    args = build_parser(paths).parse_args(argv)
    console = Console(highlight=False, markup=False, soft_wrap=True)
    _ensure_sbin_on_path()
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
