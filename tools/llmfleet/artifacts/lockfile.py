"""Writing ``pins/lock.json``: one stable rendering, so a rerun that changes nothing changes no byte.

Reading and the schema are :mod:`llmfleet.pins`; this module only renders and updates entries.
Keys are sorted, lists are kept in the order the pins were made with (sorted by name or path),
``None`` is left out except for the fields a reader checks first (a model's ``revision`` and
``files``, a runtime's ``requirements``), which stay as explicit ``null`` when unresolved.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from ..pins import DEFAULT_LOCK, Lock, ModelPin, RuntimePin, load_lock

ALWAYS = {"models": ("revision", "files"), "runtimes": ("requirements",)}


def lock_path(path: str | Path | None = None) -> Path:
    return Path(path or os.environ.get("LLMFLEET_LOCK") or DEFAULT_LOCK)


def read_lock(path: Path) -> Lock:
    """The lock at ``path``, or an empty one when the file does not exist yet."""
    if not path.exists():
        return Lock.model_validate({"schema": 1})
    return load_lock(path)


def render(lock: Lock) -> str:
    data: dict[str, Any] = lock.model_dump(mode="json", by_alias=True, exclude_none=True)
    for section, keys in ALWAYS.items():
        for entry in data.get(section, {}).values():
            for key in keys:
                entry.setdefault(key, None)
    return json.dumps(data, sort_keys=True, indent=2, ensure_ascii=False) + "\n"


def write_lock(path: Path, lock: Lock) -> bool:
    """Write ``lock`` atomically; False (and no write) when the file already holds exactly it."""
    text = render(lock)
    if path.exists() and path.read_text() == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return True


def with_runtime(lock: Lock, key: str, pin: RuntimePin) -> Lock:
    return lock.model_copy(update={"runtimes": {**lock.runtimes, key: pin}})


def with_model(lock: Lock, key: str, pin: ModelPin) -> Lock:
    return lock.model_copy(update={"models": {**lock.models, key: pin}})
