"""A model pin from a hub: the commit, every file vLLM reads with size and sha256, the checkpoint's facts.

Facts come from the pinned files (:mod:`llmfleet.artifacts.checkpoint`). The catalog
(``catalog/models.yml``) adds only what those files do not say; where it states a fact the
checkpoint also gives, the checkpoint wins and the difference is reported.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import LlmfleetError
from ..pins import ArchFacts, FilePin, ModelPin
from .checkpoint import QUANT_CONFIG_FILES, CheckpointError, fact_differences, facts_from_checkpoint
from .hub import (
    SAFETENSORS_INDEX,
    HubSource,
    index_shards,
    read_bytes,
    resolve,
    safetensors_header,
    select_files,
)
from .safetensors import read_header


@dataclass
class PinReport:
    """What ``model add`` found, for the operator."""

    commit: str
    selected: int
    skipped: dict[str, str]
    hashed_here: int  # files kept in git, downloaded and hashed on this machine
    nbytes: int
    warnings: list[str] = field(default_factory=list)
    differences: list[tuple[str, Any, Any, str]] = field(default_factory=list)  # (fact, was, now, against what)


def catalog_facts(key: str) -> dict[str, Any]:
    """What ``catalog/models.yml`` states about a model that its checkpoint's files do not (may be empty)."""
    from ..capacity import model_catalog

    entry = model_catalog().get(key) or {}
    return dict(entry.get("facts") or {})


def _json(data: bytes, where: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{where} is not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise CheckpointError(f"{where} is not a JSON object")
    return value


def pin_from_hub(
    key: str,
    source: str,
    revision: str | None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    previous: ModelPin | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> tuple[ModelPin, PinReport]:
    src = HubSource.parse(source)
    resolved = resolve(src, revision, log)
    selection = select_files(resolved.files, include, exclude)
    chosen = {f.path: f for f in selection.files}
    skipped = dict(selection.skipped)
    if "config.json" not in chosen:
        raise LlmfleetError(f"{src.uri}@{resolved.commit[:12]}: no config.json in the top folder: vLLM cannot load it")
    small: dict[str, bytes] = {}

    def fetch_small(path: str) -> bytes:
        if path not in small:
            data = read_bytes(src, resolved.commit, path)
            f = chosen[path]
            if len(data) != f.size:
                raise LlmfleetError(f"{src.uri} {path}: the hub listed {f.size} bytes and served {len(data)}")
            if f.sha256 is not None and hashlib.sha256(data).hexdigest() != f.sha256:
                raise LlmfleetError(f"{src.uri} {path}: the served file does not match the hub's own sha256")
            small[path] = data
        return small[path]

    if SAFETENSORS_INDEX in chosen:
        shards = index_shards(_json(fetch_small(SAFETENSORS_INDEX), SAFETENSORS_INDEX))
        missing = sorted(shards - set(chosen))
        if missing:
            raise LlmfleetError(f"{src.uri}@{resolved.commit[:12]}: {SAFETENSORS_INDEX} names shards the repo lacks: {', '.join(missing)}")
        asked = {p for p in chosen if any(fnmatch.fnmatch(p, g) for g in include)}
        for path in [p for p in chosen if p.endswith(".safetensors") and "/" not in p and p not in shards | asked]:
            del chosen[path]
            skipped[path] = f"not named by {SAFETENSORS_INDEX}"
    hashed_here = 0
    pins: list[FilePin] = []
    for path, f in sorted(chosen.items()):
        sha = f.sha256
        if sha is None:
            sha = hashlib.sha256(fetch_small(path)).hexdigest()
            hashed_here += 1
        pins.append(FilePin(path=path, sha256=sha, size=f.size))
    config = _json(fetch_small("config.json"), "config.json")
    extra = {name: _json(fetch_small(name), name) for name in QUANT_CONFIG_FILES if name in chosen}
    headers = None
    if "text_config" in config:  # multimodal: count what lies outside the decoder
        headers = {}
        for path in sorted(p for p in chosen if p.endswith(".safetensors")):
            headers.update(safetensors_header(src, resolved.commit, path))
    found = facts_from_checkpoint(config, extra, headers)
    facts = found.architecture
    report = PinReport(resolved.commit, len(pins), skipped, hashed_here, sum(p.size for p in pins), list(found.warnings))
    stated = catalog_facts(key)
    if stated:
        dump = facts.model_dump(exclude_none=True)
        for fact, value in stated.items():
            if fact not in dump:
                dump[fact] = value
                found.sources.append(f"catalog/models.yml ({fact})")
            elif dump[fact] != value:
                report.differences.append((fact, value, dump[fact], "catalog/models.yml"))
        facts = ArchFacts.model_validate(dump)
    if previous is not None:
        for fact, was, now in fact_differences(previous.architecture, facts):
            report.differences.append((fact, was, now, "the lock's previous entry"))
        if previous.quantization != found.quantization:
            report.differences.append(("quantization", previous.quantization, found.quantization, "the lock's previous entry"))
    notes = f"{len(pins)} of {len(resolved.files)} files of the repo: what vLLM reads"
    if skipped:
        notes += "; left out: " + "; ".join(f"{p} ({why})" for p, why in list(skipped.items())[:12])
        if len(skipped) > 12:
            notes += f"; and {len(skipped) - 12} more"
    pin = ModelPin(
        source=src.uri,
        revision=resolved.commit,
        status="resolved",
        files=pins,
        architecture=facts,
        quantization=found.quantization,
        facts_source=f"checkpoint {src.repo_id}@{resolved.commit}: " + ", ".join(found.sources),
        notes=notes,
    )
    return pin, report


def checkpoint_differences(key: str, pin: ModelPin, folder: Path) -> list[str]:
    """How a resolved pin's facts differ from what its checkpoint's files in ``folder`` (the cache
    entry) say, and where the catalog differs from the checkpoint. Empty when the folder has no
    config.json (not fetched)."""
    if not (folder / "config.json").is_file():
        return []
    cfg = _json((folder / "config.json").read_bytes(), "config.json")
    extra = {n: _json((folder / n).read_bytes(), n) for n in QUANT_CONFIG_FILES if (folder / n).is_file()}
    headers = None
    if "text_config" in cfg:
        headers = {}
        for f in pin.files or []:
            if f.path.endswith(".safetensors") and (folder / f.path).is_file():
                _, infos, _ = read_header(folder / f.path)
                headers.update({t.name: {"dtype": t.dtype, "shape": list(t.shape)} for t in infos})
    found = facts_from_checkpoint(cfg, extra, headers)
    out = [
        f"fact {fact}: the lock says {was!r}, the checkpoint's files say {now!r}"
        for fact, was, now in fact_differences(pin.architecture, found.architecture)
    ]
    if pin.quantization != found.quantization:
        out.append(f"quantization: the lock says {pin.quantization!r}, the checkpoint's files say {found.quantization!r}")
    checkpoint = found.architecture.model_dump(exclude_none=True)
    for fact, value in catalog_facts(key).items():
        if fact in checkpoint and checkpoint[fact] != value:
            out.append(f"fact {fact}: catalog/models.yml says {value!r}, the checkpoint's files say {checkpoint[fact]!r}")
    return out


def describe(report: PinReport) -> list[str]:
    """The report as lines for the operator."""
    lines = []
    if report.skipped:
        lines.append(f"{len(report.skipped)} file(s) left out: " + "; ".join(f"{p} ({why})" for p, why in report.skipped.items()))
    lines += [f"warning: {w}" for w in report.warnings]
    lines += [f"differs from {where}: {fact}: {was!r}, the checkpoint says {now!r}" for fact, was, now, where in report.differences]
    return lines
