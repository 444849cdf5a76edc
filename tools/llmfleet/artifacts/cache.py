"""The control node's artifact cache: where it is, and how files get into it verified.

Everything lands through a temporary file in the destination folder and one ``rename``, so a
reader never sees a half-written file, and nothing stays whose sha256 or size differs from
its pin.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from ..errors import LlmfleetError
from ..pins import FilePin, content_hash

CHUNK = 1 << 20


class MismatchError(LlmfleetError):
    """Content differs from its pin (sha256 or size), or pinned files are missing."""


def cache_root() -> Path:
    """``$LLMFLEET_CACHE``, else ``~/.cache/llmfleet``."""
    return Path(os.environ.get("LLMFLEET_CACHE") or Path.home() / ".cache" / "llmfleet").expanduser()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def manifest(root: Path) -> list[FilePin]:
    """Every regular file under ``root`` as {path, sha256, size}, sorted by path."""
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return [FilePin(path=p.relative_to(root).as_posix(), sha256=sha256_file(p), size=p.stat().st_size) for p in files]


def revision(files: Iterable[FilePin]) -> str:
    """A content revision: sha256 over the canonical JSON of the sorted manifest."""
    return content_hash([f.model_dump() for f in sorted(files, key=lambda f: f.path)], length=64)


def check_file(path: Path, sha256: str, size: int | None) -> str | None:
    """Why ``path`` does not match its pin, or None when it does (size first: it is cheap)."""
    if not path.is_file():
        return "missing"
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        return f"size {actual_size} != pinned {size}"
    actual = sha256_file(path)
    if actual != sha256:
        return f"sha256 {actual} != pinned {sha256}"
    return None


def check_dir(root: Path, expected: Mapping[str, tuple[str, int | None]]) -> list[str]:
    """Every way ``root`` differs from exactly ``expected`` (relative path -> sha256, size or None):
    wrong, missing and unexpected files."""
    problems = [f"{path}: {why}" for path, (sha256, size) in sorted(expected.items()) if (why := check_file(root / path, sha256, size))]
    if root.is_dir():
        extra = sorted(q.relative_to(root).as_posix() for q in root.rglob("*") if q.is_file())
        problems += [f"{path}: not in the lock" for path in extra if path not in expected]
    return problems


def expected_files(pins: Iterable[FilePin]) -> dict[str, tuple[str, int | None]]:
    return {p.path: (p.sha256, p.size) for p in pins}


def install_file(src: Path, dst: Path, sha256: str, size: int | None, *, move: bool = False) -> None:
    """Put ``src`` at ``dst`` if and only if its content matches; hash while copying.

    ``move`` renames instead of copying when ``src`` lies on the same filesystem (a download
    folder inside the cache). Raises :class:`MismatchError` and leaves ``dst`` untouched otherwise.
    """
    if (actual_size := src.stat().st_size) != size and size is not None:
        raise MismatchError(f"{src}: size {actual_size} != pinned {size}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    if move:
        actual = sha256_file(src)
        if actual != sha256:
            raise MismatchError(f"{src}: sha256 {actual} != pinned {sha256}")
        os.chmod(src, 0o644)
        os.replace(src, dst)
        return
    fd, tmp_name = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        h = hashlib.sha256()
        with src.open("rb") as fin, os.fdopen(fd, "wb") as fout:
            while chunk := fin.read(CHUNK):
                h.update(chunk)
                fout.write(chunk)
        if h.hexdigest() != sha256:
            raise MismatchError(f"{src}: sha256 {h.hexdigest()} != pinned {sha256}")
        os.chmod(tmp, 0o644)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def replace_dir(new: Path, dst: Path) -> None:
    """Swap a fully written folder into place (the old one, if any, is removed after)."""
    old = None
    if dst.exists():
        old = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.old."))
        os.replace(dst, old / dst.name)
    os.replace(new, dst)
    if old is not None:
        shutil.rmtree(old)
