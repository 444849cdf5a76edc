"""Models from a Hugging Face–style hub: resolve a pin, fetch exactly the pinned files.

The field's own client, ``huggingface_hub``, does the talking: model info with file metadata
(``/api/models/{repo}/revision/{rev}?blobs=true``), file metadata (``HEAD /{repo}/resolve/{rev}/{path}``,
following the hub's redirect to its storage host), downloads (``GET`` with ``Range`` to resume),
safetensors headers (two ranged reads). Its endpoint comes from ``HF_ENDPOINT`` and its token from
``HF_TOKEN`` or the hub's token file, read at each call; llmfleet never writes the token anywhere
and never prints it.

Resolving (:func:`resolve`) turns ``hf://ORG/REPO`` and a branch, tag or commit into the commit sha
and the files vLLM reads (:func:`select_files`), each with its size and sha256: the hub's LFS
sha256 where it has one, else the sha256 of the file downloaded and hashed here.

Fetching (:func:`fetch`) downloads into ``<cache>/downloads/<key>-<commit>/`` — one ``.part``
file per pinned file, resumed from its length after a kill — checks each finished file's size and
sha256, and only when every file is there and checked swaps the whole folder into
``<cache>/models/<key>`` (one rename). A file whose sha256 differs is deleted, never used.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ..errors import LlmfleetError
from ..pins import FilePin
from .cache import MismatchError, sha256_file

SCHEME = "hf://"
DEFAULT_ENDPOINT = "https://huggingface.co"
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
COMMIT = re.compile(r"^[0-9a-f]{40}$")
#: how often a 429 is waited out before giving up, and the longest Retry-After honoured
RATE_LIMIT_TRIES = 5
RATE_LIMIT_MAX_WAIT_S = 300.0
#: bytes the client gathers before it writes: what a killed fetch can lose per file in flight (the
#: client's own default is 10 MiB)
WRITE_CHUNK = 1 << 20

# --- which files vLLM reads ------------------------------------------------------------------------

#: weight formats in vLLM's order of preference (vllm/model_executor/model_loader/default_loader.py:
#: the first pattern that matches any file wins; .bin/.pt only without safetensors)
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth")
SAFETENSORS_INDEX = "model.safetensors.index.json"
#: non-weight files of the top folder that serving reads: configs (model, generation, quantization,
#: processor), the tokenizer in its several formats, the chat template
NEEDED_PATTERNS = (
    "*.json",
    "*.jinja",
    "tokenizer.model",
    "*.tiktoken",
    "merges.txt",
    "vocab.txt",
    "spiece.model",
    "sentencepiece*.model",
)
#: never read by vLLM even when they match the above (training leftovers)
NEVER = ("training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state*.pth", "trainer_state.json")


@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int
    sha256: str | None  # the LFS sha256; None for a file kept in git (hashed after download)


@dataclass(frozen=True)
class Selection:
    files: list[RemoteFile]
    skipped: dict[str, str]  # path -> why it is not pinned


def select_files(remote: Sequence[RemoteFile], include: Sequence[str] = (), exclude: Sequence[str] = ()) -> Selection:
    """The files vLLM would read, plus ``include`` globs, minus ``exclude`` globs.

    Top-folder files only (``original/`` and other folders hold other formats); one weight format,
    safetensors before .bin/.pt; a sharded safetensors checkpoint keeps the shards its index names.
    """
    by_path = {f.path: f for f in remote}
    skipped: dict[str, str] = {}
    top = [p for p in by_path if "/" not in p]
    for p in by_path:
        if "/" in p:
            skipped[p] = f"in the folder {p.split('/', 1)[0]}/ (vLLM reads the top folder)"
    weights: list[str] = []
    for pattern in WEIGHT_PATTERNS:
        weights = [p for p in top if fnmatch.fnmatch(p, pattern) and not _never(p)]
        if weights:
            fmt = pattern[1:]
            for p in top:
                if any(fnmatch.fnmatch(p, w) for w in WEIGHT_PATTERNS) and p not in weights and not _never(p):
                    skipped[p] = f"weights in another format ({fmt} is present)"
            break
    chosen = set(weights)
    for p in top:
        if p in chosen or p in skipped:
            continue
        if _never(p):
            skipped[p] = "not read for serving"
        elif any(fnmatch.fnmatch(p, n) for n in NEEDED_PATTERNS):
            chosen.add(p)
        else:
            skipped[p] = "not read for serving"
    for p in by_path:
        if any(fnmatch.fnmatch(p, g) for g in include):
            chosen.add(p)
            skipped.pop(p, None)
    for p in sorted(chosen):
        if any(fnmatch.fnmatch(p, g) for g in exclude):
            chosen.discard(p)
            skipped[p] = "--exclude"
    return Selection([by_path[p] for p in sorted(chosen)], dict(sorted(skipped.items())))


def _never(path: str) -> bool:
    return any(fnmatch.fnmatch(path, n) for n in NEVER)


def index_shards(index: dict[str, Any]) -> set[str]:
    """The shard files a safetensors index maps tensors to."""
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
        raise LlmfleetError(f"{SAFETENSORS_INDEX}: no weight_map")
    return {str(v) for v in weight_map.values()}


# --- the source and the client -------------------------------------------------------------------


@dataclass(frozen=True)
class HubSource:
    repo_id: str

    @classmethod
    def parse(cls, text: str) -> HubSource:
        if not text.startswith(SCHEME):
            raise LlmfleetError(f"source {text!r} is not a hub source (expected {SCHEME}ORG/REPO, e.g. hf://google/gemma-4-31B-it)")
        repo = text[len(SCHEME) :].strip("/")
        if not REPO_ID.match(repo):
            raise LlmfleetError(f"source {text!r}: {repo!r} is not ORG/REPO (letters, digits, '.', '_', '-')")
        return cls(repo)

    @property
    def uri(self) -> str:
        return SCHEME + self.repo_id


def endpoint() -> str:
    """The hub's base URL: ``HF_ENDPOINT`` (read now, not at import), else the public hub."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def _token() -> str | None:
    from huggingface_hub import get_token

    return get_token()


def _api() -> Any:
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint(), token=_token() or False, library_name="llmfleet")


class HubError(LlmfleetError):
    """A hub request that failed, in one line (never with the token)."""


class RevisionGone(HubError):
    pass


@contextlib.contextmanager
def hub_errors(repo: str, revision: str | None = None, path: str | None = None) -> Iterator[None]:
    """Turn the client's exceptions into one line each: which repo, what happened, what to do."""
    import httpx2
    from huggingface_hub import errors as hf

    what = f"{SCHEME}{repo}" + (f" revision {revision}" if revision else "") + (f" file {path}" if path else "")
    try:
        yield
    except hf.GatedRepoError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        who = "the token in use has no access" if _token() else "no token is set"
        raise HubError(
            f"{what}: the repository is gated (HTTP {status}) and {who}: accept its terms on the hub with your account, "
            "then log in (`hf auth login`) or set HF_TOKEN"
        ) from exc
    except hf.RevisionNotFoundError as exc:
        raise RevisionGone(
            f"{what}: revision not found on {endpoint()} (deleted or force-pushed?): pin again with tools/pin.py model add"
        ) from exc
    except hf.RemoteEntryNotFoundError as exc:
        raise HubError(f"{what}: no such file at this revision on {endpoint()}") from exc
    except hf.RepositoryNotFoundError as exc:
        raise HubError(f"{what}: no such repository on {endpoint()} (or it is private and no token with access is set: HF_TOKEN)") from exc
    except hf.HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status == 429:
            raise RateLimited(what, _retry_after(exc.response)) from exc
        raise HubError(f"{what}: the hub answered HTTP {status} ({_first_line(str(exc))})") from exc
    except (httpx2.ConnectError, httpx2.TimeoutException, httpx2.RemoteProtocolError, httpx2.ReadError) as exc:
        reason = _first_line(str(exc)) or type(exc).__name__
        raise HubError(f"{what}: the hub {endpoint()} is unreachable ({reason}); check HF_ENDPOINT and the network") from exc


class RateLimited(HubError):
    def __init__(self, what: str, retry_after: float | None):
        self.retry_after = retry_after
        wait_text = f"retry after {retry_after:.0f} s" if retry_after is not None else "no Retry-After given"
        super().__init__(f"{what}: rate limited by the hub (HTTP 429, {wait_text})")


def _retry_after(response: Any) -> float | None:
    value = response.headers.get("Retry-After") if response is not None else None
    return float(value) if value and value.strip().isdigit() else None


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0][:200] if text.strip() else ""


def with_rate_limit(call: Callable[[], Any], log: Callable[[str], None] = lambda _: None) -> Any:
    """Run ``call``; a 429 is waited out (its Retry-After, else 1, 2, 4 … s) up to RATE_LIMIT_TRIES times."""
    for attempt in range(1, RATE_LIMIT_TRIES + 1):
        try:
            return call()
        except RateLimited as exc:
            wait_s = exc.retry_after if exc.retry_after is not None else float(2 ** (attempt - 1))
            if attempt == RATE_LIMIT_TRIES or wait_s > RATE_LIMIT_MAX_WAIT_S:
                raise
            log(f"{exc}; waiting {wait_s:.0f} s (try {attempt} of {RATE_LIMIT_TRIES})")
            time.sleep(wait_s)
    raise AssertionError("unreachable")


# --- resolve -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Resolved:
    source: HubSource
    commit: str
    files: list[RemoteFile]
    gated: bool


def resolve(source: HubSource, revision: str | None, log: Callable[[str], None] = lambda _: None) -> Resolved:
    """The commit a branch, tag or sha names now, and every file of it with size and LFS sha256."""

    def call() -> Any:
        with hub_errors(source.repo_id, revision):
            return _api().model_info(source.repo_id, revision=revision, files_metadata=True)

    info = with_rate_limit(call, log)
    commit = str(info.sha or "")
    if not COMMIT.match(commit):
        raise HubError(f"{source.uri}: the hub gave no commit sha for revision {revision or 'main'} (got {commit!r})")
    files = [
        RemoteFile(s.rfilename, int(s.lfs.size if s.lfs else s.size or 0), str(s.lfs.sha256) if s.lfs else None)
        for s in info.siblings or []
    ]
    return Resolved(source, commit, files, bool(info.gated))


# --- fetching files ------------------------------------------------------------------------------


def _part(folder: Path, path: str) -> Path:
    return folder / ".parts" / (path.replace("/", "%2F") + ".part")


@dataclass
class Transfer:
    """Bytes on disk for each file of a fetch, for a progress bar (updated by the download threads)."""

    total: int
    done: dict[str, int] = field(default_factory=dict)
    resumed: int = 0  # bytes already on disk when the fetch started
    lock: threading.Lock = field(default_factory=threading.Lock)

    def set(self, path: str, n: int) -> None:
        with self.lock:
            self.done[path] = n

    @property
    def bytes(self) -> int:
        with self.lock:
            return sum(self.done.values())


class _Writer:
    """A file object for the client's download loop that keeps the transfer's count current."""

    def __init__(self, f: Any, transfer: Transfer, path: str, start: int) -> None:
        self.f, self.transfer, self.path, self.n = f, transfer, path, start

    def write(self, data: bytes) -> int:
        try:
            written = int(self.f.write(data))
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise DiskFull(Path(self.f.name).parent, len(data)) from exc
            raise
        self.n += written
        self.transfer.set(self.path, self.n)
        return written

    def tell(self) -> int:
        return int(self.f.tell())

    def seek(self, offset: int, whence: int = 0) -> int:
        return int(self.f.seek(offset, whence))

    def truncate(self, size: int | None = None) -> int:
        self.n = int(self.f.truncate(size))
        self.transfer.set(self.path, self.n)
        return self.n


class DiskFull(LlmfleetError):
    def __init__(self, where: Path, needed: int) -> None:
        free = shutil.disk_usage(where).free if where.exists() else 0
        super().__init__(
            f"disk full in {where}: {needed / 1e9:.2f} GB more are needed, {free / 1e9:.2f} GB are free; "
            "free space or point LLMFLEET_CACHE elsewhere (parts already downloaded are kept and resumed)"
        )


def download_file(source: HubSource, commit: str, pin: FilePin, folder: Path, transfer: Transfer) -> Path:
    """One pinned file into ``folder`` (resuming its ``.part``); checked; returns the finished path."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    constants.DOWNLOAD_CHUNK_SIZE = WRITE_CHUNK  # read by http_get at each call

    final = folder / pin.path
    if final.is_file() and final.stat().st_size == pin.size:
        transfer.set(pin.path, pin.size)
        return final
    part = _part(folder, pin.path)
    part.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.exists() else 0
    if have > pin.size:  # not a prefix of the pinned file
        part.unlink()
        have = 0
    if have < pin.size:
        url = hf_hub_url(source.repo_id, pin.path, revision=commit, endpoint=endpoint())
        token = _token() or False
        with hub_errors(source.repo_id, commit, pin.path):
            meta = get_hf_file_metadata(url, token=token, endpoint=endpoint(), retry_on_errors=True)
            headers = build_hf_headers(token=token, library_name="llmfleet")
            if urlparse(meta.location).netloc != urlparse(url).netloc:
                headers.pop("authorization", None)  # a storage host gets no credentials (the hub's own rule)
            if meta.commit_hash and meta.commit_hash != commit:
                raise HubError(f"{source.uri} {pin.path}: the hub served commit {meta.commit_hash}, the pin is {commit}")
            with part.open("ab", buffering=0) as f:
                writer: Any = _Writer(f, transfer, pin.path, have)  # the parts of BinaryIO http_get uses
                http_get(meta.location, writer, resume_size=have, headers=headers, expected_size=pin.size)
    size = part.stat().st_size
    if size != pin.size:
        part.unlink()
        raise MismatchError(f"{source.uri} {pin.path}: size {size} != pinned {pin.size}; the download was deleted")
    actual = sha256_file(part)
    if actual != pin.sha256:
        part.unlink()
        transfer.set(pin.path, 0)
        raise MismatchError(
            f"{source.uri} {pin.path}: sha256 {actual} != pinned {pin.sha256}; the download was deleted and nothing of it is used"
        )
    final.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(part, 0o644)
    os.replace(part, final)
    transfer.set(pin.path, pin.size)
    return final


def fetch(
    key: str,
    source: HubSource,
    commit: str,
    files: Sequence[FilePin],
    dst: Path,
    jobs: int = 4,
    reuse: Path | None = None,
    on_start: Callable[[Transfer], None] = lambda _: None,
) -> Transfer:
    """Make ``dst`` hold exactly ``files`` of ``source`` at ``commit``, checked, swapped in at once.

    ``reuse`` is a folder whose files are taken when size and sha256 match (the previous cache
    entry of the key): a new revision downloads only what changed.
    """
    from .cache import replace_dir

    staging = dst.parent.parent / "downloads" / f"{key}-{commit[:16]}"
    staging.mkdir(parents=True, exist_ok=True)
    transfer = Transfer(total=sum(f.size for f in files))
    todo: list[FilePin] = []
    for f in files:
        ready = staging / f.path
        old = (reuse / f.path) if reuse is not None else None
        if not ready.is_file() and old is not None and old.is_file() and old.stat().st_size == f.size and sha256_file(old) == f.sha256:
            ready.parent.mkdir(parents=True, exist_ok=True)
            if old.stat().st_dev == staging.stat().st_dev:
                os.link(old, ready)
            else:
                shutil.copy2(old, ready)
        if ready.is_file() and ready.stat().st_size == f.size:
            transfer.set(f.path, f.size)
        else:
            part = _part(staging, f.path)
            transfer.set(f.path, part.stat().st_size if part.exists() else 0)
            todo.append(f)
    transfer.resumed = transfer.bytes
    needed = transfer.total - transfer.resumed
    free = shutil.disk_usage(staging).free
    if needed > free:
        raise DiskFull(staging, needed)
    on_start(transfer)
    if todo:
        with ThreadPoolExecutor(max_workers=max(1, jobs), thread_name_prefix="fetch") as pool:
            futures = [pool.submit(download_file, source, commit, f, staging, transfer) for f in todo]
            wait(futures, return_when=FIRST_EXCEPTION)
            for fut in futures:
                if fut.done() and (error := fut.exception()) is not None:
                    for other in futures:
                        other.cancel()
                    raise error
    # every file is finished: check all (a finished file from an earlier run is checked here too)
    for f in files:
        actual = sha256_file(staging / f.path)
        if actual != f.sha256:
            (staging / f.path).unlink()
            raise MismatchError(f"{source.uri} {f.path}: sha256 {actual} != pinned {f.sha256}; deleted, fetch again")
    new = staging.with_name(staging.name + ".ready")
    shutil.rmtree(new, ignore_errors=True)
    new.mkdir()
    for f in files:
        target = new / f.path
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / f.path, target)
    os.chmod(new, 0o755)
    dst.parent.mkdir(parents=True, exist_ok=True)
    replace_dir(new, dst)
    shutil.rmtree(staging, ignore_errors=True)
    return transfer


def read_bytes(source: HubSource, commit: str, path: str) -> bytes:
    """A small file (a config) at ``commit``, through the same resolve URL as a download."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    url = hf_hub_url(source.repo_id, path, revision=commit, endpoint=endpoint())

    def call() -> bytes:
        with hub_errors(source.repo_id, commit, path):
            r = get_session().get(url, headers=build_hf_headers(token=_token() or False, library_name="llmfleet"))
            hf_raise_for_status(r)
            return bytes(r.content)

    data: bytes = with_rate_limit(call)
    return data


def safetensors_header(source: HubSource, commit: str, path: str) -> dict[str, Any]:
    """The tensors of one safetensors file (name -> dtype, shape), read with ranged requests."""

    def call() -> dict[str, Any]:
        with hub_errors(source.repo_id, commit, path):
            meta = _api().parse_safetensors_file_metadata(source.repo_id, path, revision=commit)
            return {name: {"dtype": t.dtype, "shape": list(t.shape)} for name, t in meta.tensors.items()}

    header: dict[str, Any] = with_rate_limit(call)
    return header

