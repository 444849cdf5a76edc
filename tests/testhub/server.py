"""A test hub: the part of the Hugging Face Hub's HTTP API that ``huggingface_hub`` uses to pin and
fetch a model, served from memory on loopback, with faults on demand.

Two servers, as on the real hub: the hub (``HF_ENDPOINT``) answers model info and ``resolve``;
an LFS file's ``resolve`` is a 302 to the second, the "CDN", which serves blobs by sha256 with
``Range``. What the client reads is what the real hub sends (huggingface_hub 2.4's
``file_download.get_hf_file_metadata``, ``hf_api.model_info``, ``utils._http.hf_raise_for_status``):

- ``GET /api/models/{repo}[/revision/{rev}]?blobs=true``: ``id``, ``sha``, ``gated``, ``siblings``
  with ``size``, ``blobId`` and, for LFS files, ``lfs.{sha256,size,pointerSize}``;
- ``HEAD|GET /{repo}/resolve/{rev}/{path}``: ``X-Repo-Commit``, ``ETag`` (the git blob id),
  for LFS files ``X-Linked-Etag`` (the sha256), ``X-Linked-Size`` and a 302 to the CDN;
- errors with ``X-Error-Code``: ``RepoNotFound`` (401, as the hub answers for a repo it will not
  show), ``GatedRepo`` (401 without a token, 403 with one that has no access), ``RevisionNotFound``
  and ``EntryNotFound`` (404); ``429`` with ``Retry-After`` when asked to.

Faults: :meth:`TestHub.rate_limit`, :meth:`corrupt`, :meth:`throttle`, :meth:`cut_after`,
:meth:`forget_revision`, :meth:`stop`. Every request is logged (:attr:`requests`) and every body
byte counted per path (:attr:`bytes_served`).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".model", ".gguf", ".msgpack", ".h5")
LFS_MIN_SIZE = 10 << 20  # bigger files go to LFS whatever their name


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass
class Blob:
    data: bytes
    sha256: str
    lfs: bool

    @property
    def blob_id(self) -> str:
        return git_blob_id(lfs_pointer(self.sha256, len(self.data)) if self.lfs else self.data)


@dataclass
class Repo:
    repo_id: str
    gated: bool = False
    refs: dict[str, str] = field(default_factory=dict)  # branch/tag -> commit
    commits: dict[str, dict[str, Blob]] = field(default_factory=dict)  # commit -> path -> blob


@dataclass
class Request:
    at: float
    method: str
    path: str
    status: int
    range: str | None
    authorized: bool


class TestHub:
    """Start with :meth:`start` (or as a context manager); ``endpoint`` is the ``HF_ENDPOINT``."""

    __test__ = False  # not a pytest class

    def __init__(self, tokens: dict[str, set[str]] | None = None) -> None:
        #: token -> gated repos it may read
        self.tokens: dict[str, set[str]] = tokens or {}
        self.repos: dict[str, Repo] = {}
        self.blobs: dict[str, Blob] = {}
        self.requests: list[Request] = []
        self.bytes_served: dict[str, int] = defaultdict(int)
        self.lock = threading.Lock()
        self._rate_limits: list[tuple[str, int, int]] = []  # (path glob, times left, retry_after)
        self._corrupt: set[str] = set()
        self._cut: dict[str, int] = {}  # sha256 -> bytes after which the next transfer is cut
        self.bytes_per_s: float | None = None
        self._servers: list[ThreadingHTTPServer] = []

    # --- content --------------------------------------------------------------------------------

    def publish(self, repo_id: str, files: dict[str, bytes], *, branch: str = "main", tags: tuple[str, ...] = (),
                gated: bool = False, lfs: tuple[str, ...] = ()) -> str:
        """A new commit of ``repo_id`` holding exactly ``files`` on ``branch`` (and ``tags``); its sha."""
        with self.lock:
            repo = self.repos.setdefault(repo_id, Repo(repo_id))
            repo.gated = repo.gated or gated
            tree: dict[str, Blob] = {}
            for path, data in sorted(files.items()):
                sha = hashlib.sha256(data).hexdigest()
                is_lfs = path.endswith(LFS_SUFFIXES) or len(data) >= LFS_MIN_SIZE or any(fnmatch.fnmatch(path, g) for g in lfs)
                tree[path] = self.blobs.setdefault(sha, Blob(data, sha, is_lfs)) if is_lfs else Blob(data, sha, False)
            parent = repo.refs.get(branch, "")
            commit = hashlib.sha1((parent + json.dumps({p: b.blob_id for p, b in tree.items()}, sort_keys=True)).encode()).hexdigest()
            repo.commits[commit] = tree
            repo.refs[branch] = commit
            for tag in tags:
                repo.refs[tag] = commit
            return commit

    def forget_revision(self, repo_id: str, commit: str) -> None:
        """The commit is gone (a force-push that dropped it)."""
        with self.lock:
            repo = self.repos[repo_id]
            repo.commits.pop(commit, None)
            for ref, sha in list(repo.refs.items()):
                if sha == commit:
                    del repo.refs[ref]

    # --- faults ---------------------------------------------------------------------------------

    def rate_limit(self, path_glob: str = "*", times: int = 1, retry_after: int = 1) -> None:
        """The next ``times`` requests whose path matches get 429 with ``Retry-After``."""
        with self.lock:
            self._rate_limits.append((path_glob, times, retry_after))

    def corrupt(self, sha256: str) -> None:
        """The CDN serves this blob with one byte flipped (what the pin says no longer matches)."""
        with self.lock:
            self._corrupt.add(sha256)

    def cut_after(self, sha256: str, nbytes: int) -> None:
        """The next transfer of this blob stops after ``nbytes`` (the connection is dropped)."""
        with self.lock:
            self._cut[sha256] = nbytes

    def throttle(self, bytes_per_s: float | None) -> None:
        self.bytes_per_s = bytes_per_s

    def served(self, sha256: str) -> int:
        with self.lock:
            return self.bytes_served.get(f"blob:{sha256}", 0)

    # --- servers --------------------------------------------------------------------------------

    def start(self) -> TestHub:
        hub_server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self, "hub"))
        cdn_server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self, "cdn"))
        for s in (hub_server, cdn_server):
            s.daemon_threads = True
            threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self._servers = [hub_server, cdn_server]
        self.endpoint = f"http://127.0.0.1:{hub_server.server_address[1]}"
        self.cdn = f"http://127.0.0.1:{cdn_server.server_address[1]}"
        return self

    def stop(self) -> None:
        for s in self._servers:
            s.shutdown()
            s.server_close()
        self._servers = []

    def __enter__(self) -> TestHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- request logic --------------------------------------------------------------------------

    def _take_rate_limit(self, path: str) -> int | None:
        with self.lock:
            for i, (glob, left, retry_after) in enumerate(self._rate_limits):
                if fnmatch.fnmatch(path, glob):
                    if left <= 1:
                        del self._rate_limits[i]
                    else:
                        self._rate_limits[i] = (glob, left - 1, retry_after)
                    return retry_after
        return None

    def _authorized(self, repo: Repo, token: str | None) -> int | None:
        """None when the request may read the repo, else the status the hub answers."""
        if not repo.gated:
            return None
        if token is None or token not in self.tokens:
            return 401
        return None if repo.repo_id in self.tokens[token] else 403

    def _revision(self, repo: Repo, rev: str) -> str | None:
        if rev in repo.commits:
            return rev
        commit = repo.refs.get(rev)
        return commit if commit in repo.commits else None


_API = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?$")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_BLOB = re.compile(r"^/blobs/(?P<sha>[0-9a-f]{64})$")
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def _handler(hub: TestHub, role: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "llmfleet-testhub"

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

        def do_HEAD(self) -> None:
            self._serve(head=True)

        def do_GET(self) -> None:
            self._serve(head=False)

        # --- plumbing ---

        def _token(self) -> str | None:
            auth = self.headers.get("Authorization") or ""
            return auth[7:].strip() if auth.lower().startswith("bearer ") else None

        def _log(self, status: int) -> None:
            with hub.lock:
                hub.requests.append(Request(time.monotonic(), self.command, self.path, status, self.headers.get("Range"),
                                            self._token() is not None))

        def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, head: bool = False) -> None:
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head and body:
                self.wfile.write(body)
            self._log(status)

        def _error(self, status: int, code: str, message: str, head: bool, extra: dict[str, str] | None = None) -> None:
            body = json.dumps({"error": message}).encode()
            headers = {"Content-Type": "application/json", "X-Error-Code": code, "X-Error-Message": message, **(extra or {})}
            self._send(status, body, headers, head)

        # --- routes ---

        def _serve(self, head: bool) -> None:
            url = urlparse(self.path)
            path = unquote(url.path)
            retry_after = hub._take_rate_limit(path)
            if retry_after is not None:
                self._error(429, "RateLimited", "Too many requests", head, {"Retry-After": str(retry_after)})
                return
            if role == "cdn":
                m = _BLOB.match(url.path)
                if not m or m["sha"] not in hub.blobs:
                    self._error(404, "EntryNotFound", "no such blob", head)
                    return
                self._blob(hub.blobs[m["sha"]], head)
                return
            if m := _API.match(url.path):
                self._model_info(unquote(m["repo"]), unquote(m["rev"] or "main"), parse_qs(url.query), head)
            elif m := _RESOLVE.match(url.path):
                self._resolve(unquote(m["repo"]), unquote(m["rev"]), unquote(m["path"]), head)
            else:
                self._error(404, "NotFound", f"no route for {path}", head)

        def _repo(self, repo_id: str, head: bool) -> Repo | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(401, "RepoNotFound", f"Repository Not Found for url: {self.path}.", head)
            return repo

        def _model_info(self, repo_id: str, rev: str, query: dict[str, list[str]], head: bool) -> None:
            repo = self._repo(repo_id, head)
            if repo is None:
                return
            commit = hub._revision(repo, rev)
            if commit is None:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
                return
            blobs = query.get("blobs", ["false"])[0].lower() == "true"
            siblings = []
            for p, b in sorted(repo.commits[commit].items()):
                s: dict[str, Any] = {"rfilename": p}
                if blobs:
                    s["size"] = len(b.data)
                    s["blobId"] = b.blob_id
                    if b.lfs:
                        s["lfs"] = {"sha256": b.sha256, "size": len(b.data), "pointerSize": len(lfs_pointer(b.sha256, len(b.data)))}
                siblings.append(s)
            info = {"_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24], "id": repo_id, "modelId": repo_id, "sha": commit,
                    "private": False, "gated": "manual" if repo.gated else False, "disabled": False, "downloads": 0, "likes": 0,
                    "tags": [], "library_name": "transformers", "siblings": siblings,
                    "lastModified": "2026-12-01T00:00:00.000Z", "createdAt": "2026-12-01T00:00:00.000Z"}
            self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"}, head)

        def _resolve(self, repo_id: str, rev: str, path: str, head: bool) -> None:
            repo = self._repo(repo_id, head)
            if repo is None:
                return
            denied = hub._authorized(repo, self._token())
            if denied:
                text = (f"Access to model {repo_id} is restricted. You must have access to it and be authenticated to access it."
                        if denied == 401 else f"Access to model {repo_id} is restricted and you are not in the authorized list.")
                self._error(denied, "GatedRepo", text, head)
                return
            commit = hub._revision(repo, rev)
            if commit is None:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
                return
            blob = repo.commits[commit].get(path)
            if blob is None:
                self._error(404, "EntryNotFound", f"{path} does not exist at {commit}", head, {"X-Repo-Commit": commit})
                return
            headers = {"X-Repo-Commit": commit, "ETag": f'"{blob.blob_id}"', "Accept-Ranges": "bytes"}
            if blob.lfs:
                headers |= {"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(len(blob.data)),
                            "Location": f"{hub.cdn}/blobs/{blob.sha256}"}
                self._send(302, b"", headers, head)
                return
            self._body(blob.data, f"file:{repo_id}/{path}", headers, head)

        def _blob(self, blob: Blob, head: bool) -> None:
            data = blob.data
            if blob.sha256 in hub._corrupt and data:
                data = bytes([data[0] ^ 0xFF]) + data[1:]
            self._body(data, f"blob:{blob.sha256}", {"ETag": f'"{blob.sha256}"', "Accept-Ranges": "bytes"}, head, cut_key=blob.sha256)

        def _body(self, data: bytes, key: str, headers: dict[str, str], head: bool, cut_key: str | None = None) -> None:
            start, end, status = 0, len(data), 200
            rng = self.headers.get("Range")
            if rng and (m := _RANGE.match(rng.strip())):
                if m[1]:
                    start = int(m[1])
                    end = min(len(data), int(m[2]) + 1) if m[2] else len(data)
                elif m[2]:
                    start = max(0, len(data) - int(m[2]))
                if start >= len(data) and len(data) > 0:
                    self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"}, head)
                    return
                status = 206
                headers = headers | {"Content-Range": f"bytes {start}-{max(start, end - 1)}/{len(data)}"}
            body = data[start:end]
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self._log(status)
            if head:
                return
            with hub.lock:
                cut = hub._cut.pop(cut_key, None) if cut_key else None
            sent, step = 0, 256 << 10
            while sent < len(body):
                chunk = body[sent : sent + step]
                if cut is not None and sent + len(chunk) > cut:
                    chunk = chunk[: max(0, cut - sent)]
                try:
                    self.wfile.write(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    return
                sent += len(chunk)
                with hub.lock:
                    hub.bytes_served[key] += len(chunk)
                if cut is not None and sent >= cut:
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if hub.bytes_per_s:
                    time.sleep(len(chunk) / hub.bytes_per_s)

    return Handler
