"""The cached Debian rootfs tarball (RootfsSpec, debootstrap) and each host's machine root unpacked from it."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from .config import Host, LabPaths
from .network import NETWORK_FILE, host_nameservers, render_hosts, render_network, render_resolv
from .system import LabError, locked, one_line, remove_tree, require_tools, run, write_file

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


def ensure_rootfs(spec: RootfsSpec, paths: LabPaths, console: Console) -> Path:
    tarball = spec.tarball(paths.cache)
    if tarball.is_file():
        return tarball
    require_tools(["debootstrap", "tar"])
    with locked(tarball.parent / ".lock", "rootfs build") as lock_fd:
        if not tarball.is_file():  # another build may have finished while we waited
            _build_rootfs(spec, tarball, lock_fd, console)
    return tarball


def _build_rootfs(spec: RootfsSpec, tarball: Path, lock_fd: int, console: Console) -> None:
    for stale in tarball.parent.glob(".build-*"):  # we hold the lock: any build dir is a dead one
        remove_tree(stale)
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
        remove_tree(work)
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
        last = one_line(proc.stderr)[-200:] or "see the log"
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
    remove_tree(staging)
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
