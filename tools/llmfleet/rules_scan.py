"""Which architectures declare ``SupportsPP`` in a vLLM release: a static scan, run when pinning.

The planner must not import vLLM (the control node has none, and importing it would pull torch).
So when a runtime is pinned, this module reads the release itself — a wheel (a zip) or a source
tree — with :mod:`ast`: the architecture → ``(module, class)`` mapping of
``vllm/model_executor/models/registry.py``, then each class and its bases, through the imports of
the module that defines it, until ``SupportsPP`` (vLLM's interface in ``models/interfaces.py``) is
found or the bases leave the tree. A class body that assigns ``supports_pp`` decides for itself.
The result is stored in the lock (``runtimes.<key>.supports_pp``); nothing is executed.

``python -m llmfleet.rules_scan vllm-0.19.0-....whl`` prints the result as JSON.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import re
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

REGISTRY = "vllm/model_executor/models/registry.py"
MODELS_PACKAGE = "vllm.model_executor.models"
INTERFACE = "SupportsPP"
#: registry tables whose values are ``(module, class)``; the others hold strings (URLs, versions)
_TABLE_RE = re.compile(r"^_[A-Z0-9_]*_MODELS$")


class ScanError(Exception):
    """The source could not be read as a vLLM release."""


class Release:
    """Text files of a release, from a wheel or a directory, addressed by posix path."""

    def __init__(self, path: Path):
        self.path = path
        self._zip: zipfile.ZipFile | None = None
        self._root: Path | None = None
        if path.is_file():
            try:
                self._zip = zipfile.ZipFile(path)
            except zipfile.BadZipFile as exc:
                raise ScanError(f"{path} is neither a wheel (zip) nor a source directory") from exc
            self._names = set(self._zip.namelist())
        elif path.is_dir():
            # accept the repository root, its parent of vllm/, or the vllm package itself
            root = path
            if (path / "vllm").is_dir():
                root = path
            elif path.name == "vllm" and (path / "model_executor").is_dir():
                root = path.parent
            self._root = root
            self._names = set()
        else:
            raise ScanError(f"{path} not found")

    def read(self, name: str) -> str | None:
        if self._zip is not None:
            if name not in self._names:
                return None
            return self._zip.read(name).decode("utf-8", errors="replace")
        assert self._root is not None
        p = self._root / name
        return p.read_text(encoding="utf-8", errors="replace") if p.is_file() else None

    def sha256(self) -> str | None:
        """The wheel's sha256 (a source tree has none)."""
        if self._zip is None:
            return None
        h = hashlib.sha256()
        with self.path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()

    def version(self) -> str | None:
        text = self.read("vllm/_version.py")
        if text:
            m = re.search(r"""(?:__version__|version)\s*(?::\s*str\s*)?=\s*['"]([^'"]+)['"]""", text)
            if m:
                return m.group(1)
        if self._zip is not None:
            m = re.match(r"^vllm(?:_cpu)?-([0-9][^-]*)-", self.path.name)
            if m:
                return m.group(1)
        return None


@dataclass
class _Module:
    name: str  # dotted
    is_package: bool
    classes: dict[str, ast.ClassDef]
    imports: dict[str, tuple[str, str]]  # local name -> (module, name); name "" for `import x as y`
    aliases: dict[str, str]  # `X = Y` at module level


@dataclass
class ScanResult:
    engine_version: str | None
    source: str
    source_sha256: str | None = None
    supports_pp: list[str] = field(default_factory=list)
    no_pp: list[str] = field(default_factory=list)
    unresolved: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return {
            "engine_version": self.engine_version,
            "source": self.source,
            "source_sha256": self.source_sha256,
            "method": "static ast scan of vllm/model_executor/models (no import), llmfleet.rules_scan",
            "supports_pp": self.supports_pp,
            "no_pp": self.no_pp,
            "unresolved": self.unresolved,
        }


def _module_file(module: str) -> list[str]:
    base = module.replace(".", "/")
    return [f"{base}.py", f"{base}/__init__.py"]


def resolve_relative(current: str, is_package: bool, level: int, module: str | None) -> str:
    """The absolute module a relative import (``from ..x import y`` in ``current``) names."""
    parts = current.split(".")
    if not is_package:
        parts = parts[:-1]
    if level > 1:
        parts = parts[: len(parts) - (level - 1)]
    return ".".join(parts + ([module] if module else []))


class _Scanner:
    def __init__(self, source: Release):
        self.source = source
        self._modules: dict[str, _Module | None] = {}
        self._verdicts: dict[tuple[str, str], bool | None] = {}

    def module(self, name: str) -> _Module | None:
        if name in self._modules:
            return self._modules[name]
        mod: _Module | None = None
        for candidate in _module_file(name):
            text = self.source.read(candidate)
            if text is None:
                continue
            try:
                tree = ast.parse(text)
            except SyntaxError:
                break
            mod = self._index(name, candidate.endswith("__init__.py"), tree)
            break
        self._modules[name] = mod
        return mod

    @staticmethod
    def _index(name: str, is_package: bool, tree: ast.Module) -> _Module:
        classes: dict[str, ast.ClassDef] = {}
        imports: dict[str, tuple[str, str]] = {}
        aliases: dict[str, str] = {}

        def visit(body: list[ast.stmt]) -> None:
            for node in body:
                if isinstance(node, ast.ClassDef):
                    classes[node.name] = node
                elif isinstance(node, ast.ImportFrom):
                    target = resolve_relative(name, is_package, node.level, node.module) if node.level else (node.module or "")
                    for a in node.names:
                        imports[a.asname or a.name] = (target, a.name)
                elif isinstance(node, ast.Import):
                    for a in node.names:
                        imports[a.asname or a.name.split(".")[0]] = (a.name if a.asname else a.name.split(".")[0], "")
                elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                    if isinstance(node.value, ast.Name):
                        aliases[node.targets[0].id] = node.value.id
                elif isinstance(node, ast.If | ast.Try):
                    # TYPE_CHECKING blocks and optional imports
                    visit(node.body)
                    for extra in getattr(node, "orelse", []) or []:
                        visit([extra])
                    for handler in getattr(node, "handlers", []) or []:
                        visit(handler.body)

        visit(tree.body)
        return _Module(name, is_package, classes, imports, aliases)

    def _lookup(self, module: str, name: str, depth: int = 0) -> tuple[str, str] | None:
        """Where class ``name`` as seen from ``module`` is defined: (module, class)."""
        if depth > 20:
            return None
        mod = self.module(module)
        if mod is None:
            return None
        if name in mod.classes:
            return module, name
        if name in mod.aliases and mod.aliases[name] != name:
            return self._lookup(module, mod.aliases[name], depth + 1)
        if name in mod.imports:
            target, orig = mod.imports[name]
            if not orig:
                return None
            if not target.startswith("vllm"):
                return (target, orig) if orig == INTERFACE else None
            found = self._lookup(target, orig, depth + 1)
            if found is None and self.module(f"{target}.{orig}") is not None:
                return None  # a submodule, not a class
            return found or ((target, orig) if orig == INTERFACE else None)
        return None

    def _base_ref(self, module: str, node: ast.expr) -> tuple[str, str] | None:
        if isinstance(node, ast.Subscript):  # Generic[...] / Mixin[T]
            return self._base_ref(module, node.value)
        if isinstance(node, ast.Name):
            if node.id == INTERFACE:
                return ("vllm.model_executor.models.interfaces", INTERFACE)
            return self._lookup(module, node.id)
        if isinstance(node, ast.Attribute):
            if node.attr == INTERFACE:
                return ("vllm.model_executor.models.interfaces", INTERFACE)
            if isinstance(node.value, ast.Name):
                mod = self.module(module)
                if mod and node.value.id in mod.imports:
                    target, orig = mod.imports[node.value.id]
                    full = f"{target}.{orig}" if orig else target
                    return self._lookup(full, node.attr)
        return None

    def supports_pp(self, module: str, cls: str, depth: int = 0) -> bool | None:
        key = (module, cls)
        if key in self._verdicts:
            return self._verdicts[key]
        if cls == INTERFACE:
            return True
        if depth > 30:
            return None
        self._verdicts[key] = False  # cycle guard
        mod = self.module(module)
        if mod is not None and cls not in mod.classes:
            # re-exported (a package __init__ importing from its submodules)
            where = self._lookup(module, cls)
            verdict_elsewhere = None if where is None or where == key else self.supports_pp(*where, depth=depth + 1)
            self._verdicts[key] = verdict_elsewhere
            return verdict_elsewhere
        if mod is None:
            self._verdicts[key] = None
            return None
        node = mod.classes[cls]
        verdict: bool | None = False
        declared = _declared_supports_pp(node)
        if declared is not None:
            verdict = declared
        else:
            for base in node.bases:
                ref = self._base_ref(module, base)
                if ref is None:
                    continue
                if ref[1] == INTERFACE:
                    verdict = True
                    break
                if self.supports_pp(ref[0], ref[1], depth + 1):
                    verdict = True
                    break
        self._verdicts[key] = verdict
        return verdict


def _declared_supports_pp(node: ast.ClassDef) -> bool | None:
    for stmt in node.body:
        target: ast.expr | None = None
        value: ast.expr | None = None
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
            target, value = stmt.targets[0], stmt.value
        elif isinstance(stmt, ast.AnnAssign):
            target, value = stmt.target, stmt.value
        if isinstance(target, ast.Name) and target.id == "supports_pp" and isinstance(value, ast.Constant):
            return bool(value.value)
    return None


def registry_entries(text: str) -> Iterator[tuple[str, str, str]]:
    """``(architecture, module, class)`` from the ``_*_MODELS`` tables of registry.py."""
    tree = ast.parse(text)
    for node in tree.body:
        targets: list[ast.expr] = []
        value: ast.expr | None = None
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        if not isinstance(value, ast.Dict):
            continue
        if not any(isinstance(t, ast.Name) and _TABLE_RE.match(t.id) for t in targets):
            continue
        for k, v in zip(value.keys, value.values, strict=True):
            if k is None:  # **spread of another table, scanned on its own
                continue
            if (
                isinstance(k, ast.Constant)
                and isinstance(k.value, str)
                and isinstance(v, ast.Tuple)
                and len(v.elts) == 2
                and all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in v.elts)
            ):
                mod, cls = (e.value for e in v.elts)  # type: ignore[attr-defined]
                yield k.value, mod, cls


def scan_supports_pp(path: str | Path) -> ScanResult:
    """Scan a vLLM wheel or source tree; architectures are sorted, unresolved ones say why."""
    src = Release(Path(path))
    text = src.read(REGISTRY)
    if text is None:
        raise ScanError(f"{path}: no {REGISTRY} (not a vLLM wheel or source tree)")
    scanner = _Scanner(src)
    result = ScanResult(engine_version=src.version(), source=Path(path).name, source_sha256=src.sha256())
    seen: dict[str, bool | None] = {}
    for arch, module, cls in registry_entries(text):
        if arch in seen:
            continue
        full = module if module.startswith("vllm.") else f"{MODELS_PACKAGE}.{module}"
        verdict = scanner.supports_pp(full, cls)
        seen[arch] = verdict
        if verdict is None:
            result.unresolved[arch] = f"class {cls} not found in {full}"
    result.supports_pp = sorted(a for a, v in seen.items() if v)
    result.no_pp = sorted(a for a, v in seen.items() if v is False)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="rules_scan", description="List the architectures that declare SupportsPP in a vLLM release.")
    p.add_argument("source", help="a vLLM wheel (.whl) or source tree")
    args = p.parse_args(argv)
    try:
        result = scan_supports_pp(args.source)
    except ScanError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result.to_dict(), indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
