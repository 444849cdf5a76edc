"""Artifacts by content: the blob view of a cache, the upstream server, bundles for air-gapped sites.

Every pinned file — a runtime's wheel, a model's file — is named by its sha256 wherever it travels
between sites: ``<root>/blobs/sha256/<hex>`` in the control node's cache (hard links to the files
under ``models/`` and ``wheelhouse/``, no extra space), ``/sha256/<hex>`` on the upstream server
and on a site's mirror, ``blobs/sha256/<hex>`` in a bundle. A blob's name is its check: whoever
receives one hashes it and keeps it only when the hash is its name.

- :func:`link_blobs`: the blob view of what a lock pins and the cache holds (``tools/pin.py fetch``
  keeps it current);
- :func:`serve`: a read-only HTTP server of ``/sha256/<hex>`` over one or more roots, with
  ``Range`` (``tools/pin.py serve``), the upstream a site's mirror fills itself from;
- :func:`export_bundle` / :func:`import_bundle`: one tar holding every blob the plans of an
  inventory (or one site of it) use, the lock and a manifest; the same inputs give the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from ..errors import LlmfleetError
from ..pins import Lock
from .cache import CHUNK, MismatchError, sha256_file

SHA256 = re.compile(r"^[0-9a-f]{64}$")
BUNDLE_SCHEMA = "llmfleet.bundle/1"
Log = Callable[[str], None]


@dataclass(frozen=True)
class Blob:
    sha256: str
    size: int
    kind: str  # "wheel" | "model"
    name: str  # what it is: "<runtime key>/<wheel file>" or "<model key>/<path>"


def blob_path(root: Path, sha256: str) -> Path:
    return root / "blobs" / "sha256" / sha256


def lock_blobs(lock: Lock, runtimes: Iterable[str] | None = None, models: Iterable[str] | None = None) -> list[Blob]:
    """Every file the named (default: all resolved) runtimes and models of ``lock`` pin, once per sha256."""
    out: dict[str, Blob] = {}
    for key in sorted(lock.runtimes if runtimes is None else runtimes):
        pin = lock.runtimes[key]
        for r in pin.requirements or []:
            if r.filename and r.size is not None:
                out.setdefault(r.sha256, Blob(r.sha256, r.size, "wheel", f"{key}/{r.filename}"))
    for key in sorted(lock.models if models is None else models):
        mpin = lock.models[key]
        for f in mpin.files or []:
            out.setdefault(f.sha256, Blob(f.sha256, f.size, "model", f"{key}/{f.path}"))
    return sorted(out.values(), key=lambda b: (b.kind, b.name))


def cache_file(root: Path, blob: Blob) -> Path:
    """Where the cache keeps a blob under its name (``models/<key>/<path>``, ``wheelhouse/<key>/<file>``)."""
    return root / ("models" if blob.kind == "model" else "wheelhouse") / blob.name


def link_blobs(root: Path, blobs: Iterable[Blob]) -> int:
    """Hard-link each blob the cache holds under its name into ``blobs/sha256/``, once its content is
    checked against the name (the file under ``models/<key>`` may belong to another pin of the key
    than the lock asks about). Returns how many links were made."""
    made = 0
    for b in blobs:
        src, dst = cache_file(root, b), blob_path(root, b.sha256)
        if dst.exists() or not src.is_file() or src.stat().st_size != b.size or sha256_file(src) != b.sha256:
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copy2(src, tmp)
        os.replace(tmp, dst)
        made += 1
    return made


# --- the upstream server --------------------------------------------------------------------------

_PATH = re.compile(r"^/sha256/(?P<sha>[0-9a-f]{64})$")
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


def find_blob(roots: Sequence[Path], sha256: str) -> Path | None:
    for root in roots:
        p = blob_path(root, sha256)
        if p.is_file():
            return p
    return None


def make_server(roots: Sequence[Path], bind: tuple[str, int], log: Log = lambda _: None) -> ThreadingHTTPServer:
    """A read-only server of ``GET|HEAD /sha256/<hex>`` (with ``Range``) over the roots' blob views."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "llmfleet-upstream"

        def log_message(self, format: str, *args: Any) -> None:
            log(f"{self.address_string()} {format % args}")

        def do_HEAD(self) -> None:
            self._serve(head=True)

        def do_GET(self) -> None:
            self._serve(head=False)

        def _plain(self, status: int, text: str, head: bool) -> None:
            body = (text + "\n").encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _serve(self, head: bool) -> None:
            m = _PATH.match(self.path.split("?", 1)[0])
            if self.path == "/healthz":
                self._plain(200, "ok", head)
                return
            path = find_blob(roots, m["sha"]) if m else None
            if path is None:
                self._plain(404, "no such blob", head)
                return
            size = path.stat().st_size
            start, end, status = 0, size, 200
            rng = self.headers.get("Range")
            if rng and (r := _RANGE.match(rng.strip())):
                start = int(r[1])
                end = min(size, int(r[2]) + 1) if r[2] else size
                if start >= size:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                status = 206
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("ETag", f'"{m["sha"] if m else ""}"')
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
            self.send_header("Content-Length", str(end - start))
            self.end_headers()
            if head:
                return
            with path.open("rb") as f:
                f.seek(start)
                left = end - start
                while left > 0:
                    chunk = f.read(min(CHUNK, left))
                    if not chunk:
                        break
                    try:
                        self.wfile.write(chunk)
                    except (BrokenPipeError, ConnectionResetError):
                        return
                    left -= len(chunk)

    server = ThreadingHTTPServer(bind, Handler)
    server.daemon_threads = True
    return server


def serve_in_thread(roots: Sequence[Path], bind: tuple[str, int] = ("127.0.0.1", 0)) -> ThreadingHTTPServer:
    server = make_server(roots, bind)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server


# --- bundles -------------------------------------------------------------------------------------


def _tarinfo(name: str, size: int, mode: int = 0o644) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime, info.uid, info.gid, info.uname, info.gname = size, mode, 0, 0, 0, "root", "root"
    return info


def export_bundle(out: Path, blobs: Sequence[Blob], roots: Sequence[Path], lock_text: str, meta: dict[str, Any], log: Log) -> int:
    """Write the bundle: ``manifest.json``, ``lock.json``, then ``blobs/sha256/<hex>`` in sha256 order.

    Plain tar (the blobs are weights and wheels: they do not compress), every header fixed (mtime 0,
    root:root, 0644), so the same inputs give the same bytes. Every blob is hashed while it is
    written; a blob the roots lack or that does not match its name stops the export.
    """
    missing = [b.name for b in blobs if find_blob(roots, b.sha256) is None]
    if missing:
        raise LlmfleetError(
            f"{len(missing)} pinned file(s) are not in the cache, e.g. {missing[0]}: run tools/pin.py fetch with the same inventory first"
        )
    manifest = {
        "schema": BUNDLE_SCHEMA,
        **meta,
        "blobs": [{"sha256": b.sha256, "size": b.size, "kind": b.kind, "name": b.name} for b in sorted(blobs, key=lambda b: b.sha256)],
        "bytes": sum(b.size for b in blobs),
    }
    tmp = out.with_name(f".{out.name}.tmp")
    written = 0
    with tmp.open("wb") as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        head = json.dumps(manifest, indent=2, sort_keys=True).encode() + b"\n"
        for name, data in (("manifest.json", head), ("lock.json", lock_text.encode())):
            tar.addfile(_tarinfo(name, len(data)), io.BytesIO(data))
        for b in sorted(blobs, key=lambda b: b.sha256):
            src = find_blob(roots, b.sha256)
            assert src is not None
            reader = _HashingReader(src.open("rb"))
            tar.addfile(_tarinfo(f"blobs/sha256/{b.sha256}", b.size), reader)
            reader.f.close()
            if reader.hash.hexdigest() != b.sha256:
                raise MismatchError(f"{src}: sha256 {reader.hash.hexdigest()} != {b.sha256} ({b.name}); the bundle was not written")
            written += b.size
            log(f"  {b.name} ({b.size / 1e6:.1f} MB)")
    os.replace(tmp, out)
    return written


class _HashingReader:
    def __init__(self, f: io.BufferedReader) -> None:
        self.f, self.hash = f, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.hash.update(data)
        return data


@dataclass(frozen=True)
class ImportReport:
    blobs: int
    added: int
    nbytes: int
    manifest: dict[str, Any]


def import_bundle(bundle: Path, into: Path, log: Log) -> ImportReport:
    """Check every blob of the bundle against its name and the manifest, then place it in ``into``
    (``into/sha256/<hex>``, the mirror's layout). Each blob lands through a temporary file and one
    rename; a blob that does not match is refused and nothing of it stays."""
    try:
        tar = tarfile.open(bundle, mode="r:")  # noqa: SIM115 (closed by the with below; opening is what may fail)
    except (OSError, tarfile.TarError) as exc:
        raise LlmfleetError(f"{bundle}: not a bundle ({exc})") from exc
    added = nbytes = count = 0
    with tar:
        manifest = _manifest(tar, bundle)
        expected = {b["sha256"]: int(b["size"]) for b in manifest["blobs"]}
        seen: set[str] = set()
        target = into / "sha256"
        target.mkdir(parents=True, exist_ok=True)
        for member in tar:
            m = re.fullmatch(r"blobs/sha256/([0-9a-f]{64})", member.name)
            if member.name in ("manifest.json", "lock.json"):
                continue
            if not m or not member.isfile():
                raise LlmfleetError(
                    f"{bundle}: unexpected member {member.name!r} (a bundle holds manifest.json, lock.json, blobs/sha256/<hex>)"
                )
            sha = m[1]
            if sha not in expected or member.size != expected[sha]:
                raise MismatchError(f"{bundle}: {member.name} ({member.size} bytes) is not in the manifest as such")
            count += 1
            seen.add(sha)
            dst = target / sha
            if dst.is_file() and dst.stat().st_size == member.size and sha256_file(dst) == sha:
                continue
            src = tar.extractfile(member)
            assert src is not None
            tmp = target / f".{sha}.import"
            h = hashlib.sha256()
            with tmp.open("wb") as f:
                while chunk := src.read(CHUNK):
                    h.update(chunk)
                    f.write(chunk)
            if h.hexdigest() != sha:
                tmp.unlink()
                raise MismatchError(f"{bundle}: {member.name} has sha256 {h.hexdigest()}: refused, nothing of it kept")
            os.chmod(tmp, 0o644)
            os.replace(tmp, dst)
            added += 1
            nbytes += member.size
        lacking = sorted(set(expected) - seen)
        if lacking:
            raise MismatchError(f"{bundle}: {len(lacking)} blob(s) of the manifest are missing, e.g. {lacking[0]}")
    log(f"{bundle}: {count} blobs checked, {added} added ({nbytes / 1e6:.1f} MB) into {target}")
    return ImportReport(count, added, nbytes, manifest)


def _manifest(tar: tarfile.TarFile, bundle: Path) -> dict[str, Any]:
    try:
        member = tar.getmember("manifest.json")
        f = tar.extractfile(member)
        assert f is not None
        manifest = json.loads(f.read())
    except (KeyError, ValueError, AssertionError) as exc:
        raise LlmfleetError(f"{bundle}: no readable manifest.json") from exc
    if manifest.get("schema") != BUNDLE_SCHEMA:
        raise LlmfleetError(f"{bundle}: manifest schema {manifest.get('schema')!r}, expected {BUNDLE_SCHEMA}")
    return dict(manifest)

