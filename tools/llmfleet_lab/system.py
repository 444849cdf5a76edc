"""Running commands and touching files on the control node: LabError, run, tool and root checks, locks, atomic writes."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any


class LabError(Exception):
    """A failure reported as a clear message, never as a traceback."""


TOOL_PACKAGES = {
    "systemd-nspawn": "systemd-container",
    "debootstrap": "debootstrap",
    "ip": "iproute2",
    "iptables": "iptables",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "tar": "tar",
}


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


def one_line(text: str) -> str:
    return " ".join(text.split())


def run(
    argv: Sequence[str], *, check: bool = True, stdout: Any = subprocess.PIPE, pass_fds: Sequence[int] = ()
) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(list(argv), text=True, stdout=stdout, stderr=subprocess.PIPE, check=False, pass_fds=pass_fds)
    except FileNotFoundError:
        raise LabError(missing_tools_message([argv[0]])) from None
    if check and proc.returncode != 0:
        detail = one_line(proc.stderr or "")[-300:] or "no error output"
        raise LabError(f"`{shlex.join(argv)}` failed (exit {proc.returncode}): {detail}")
    return proc


def ensure_sbin_on_path() -> None:
    parts = os.environ.get("PATH", "").split(os.pathsep)
    extra = [d for d in ("/usr/local/sbin", "/usr/sbin", "/sbin") if d not in parts]
    os.environ["PATH"] = os.pathsep.join([*parts, *extra])


def require_root(command: str) -> None:
    if os.geteuid() != 0:
        raise LabError(f"`lab {command}` needs root (systemd-nspawn, network namespaces, iptables): run it as root")


@contextlib.contextmanager
def locked(path: Path, what: str) -> Iterator[int]:
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


def remove_tree(path: Path) -> None:
    if path.exists() or path.is_symlink():
        _umount_under(path)
        shutil.rmtree(path)
