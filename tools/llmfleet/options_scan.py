"""The option list of a vLLM release's API server, read statically when a runtime is pinned.

vLLM's server takes about 300 flags, and its parser (argparse) accepts any unique prefix of one,
the last value given winning: ``--hos 0.0.0.0`` rebinds a server the plan binds to loopback. So the
planner checks ``engine_args`` against the pinned engine's own option list, each flag with the type
of value it takes. The control node has no vLLM (and importing it would pull torch), so, like the
SupportsPP scan (:mod:`llmfleet.rules_scan`), this module reads the release (a wheel or a source
tree) with :mod:`ast` and executes nothing:

* the entry point the plan runs (``python -m vllm.entrypoints.openai.api_server``): its
  ``if __name__ == "__main__"`` block, followed through the functions it calls (``main``,
  ``make_arg_parser``, ``FrontendArgs.add_cli_args``, ``AsyncEngineArgs.add_cli_args``, ...);
* every ``add_argument`` on the parser or one of its groups: the option strings, and the keywords
  it passes, either literal or a field's entry of ``get_kwargs(<config class>)``;
* ``get_kwargs``: vLLM turns a config dataclass field's type annotation into argparse keywords
  (``vllm/engine/arg_utils.py``, ``_compute_kwargs``); the same rules are applied here to the
  annotation's AST, type aliases and imports followed through the release;
* the edits the functions make to those keywords before registering them (``kw["type"] = ...``,
  ``del kw["nargs"]``, ``kw["choices"].remove(...)``), and the loop that registers every field
  of a frontend dataclass.

Each option is recorded as :class:`EngineOption`: its value type (``bool`` for ``--x/--no-x``,
``flag`` for a switch without a value, ``int``, ``float``, ``str``, ``json``; ``list[...]`` for a
flag that takes several values; ``optional[str]`` for a value that may be left out), its choices,
its ``dest`` where it differs from the name, and its other spellings (``-tp``). The integration
test compares the result with the parser the pinned CPU runtime itself builds.

``python -m llmfleet.options_scan WHEEL_OR_SOURCE`` prints it as JSON.
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .pins import EngineOption
from .rules_scan import Release, ScanError, resolve_relative

#: the module the plan's argv runs (``plan.API_SERVER_MODULE``)
ENTRY_MODULE = "vllm.entrypoints.openai.api_server"
METHOD = "static ast scan of the API server's argument parser (no import), llmfleet.options_scan"

_BUILTIN = {"int", "float", "str", "bool", "dict", "list", "tuple", "set", "frozenset", "bytes", "object", "type"}
_TYPING = {"typing", "typing_extensions", "collections.abc", "types"}
_UNION = {"Union", "Optional", "UnionType"}
_LIST_LIKE = {"list": "list", "List": "list", "Sequence": "list", "tuple": "tuple", "Tuple": "tuple", "set": "set", "Set": "set",
              "frozenset": "set", "FrozenSet": "set"}
_DICT_LIKE = {"dict", "Dict", "Mapping", "MutableMapping", "OrderedDict", "defaultdict"}
_JSON_PARSERS = {"loads", "union_dict_and_str", "parse_dataclass"}
_DEPTH = 40


class _Unknown:
    """A value the interpreter does not model (a call it does not follow, an expression it skips)."""

    def __repr__(self) -> str:
        return "<unknown>"


UNKNOWN = _Unknown()


@dataclass
class OptionsScan:
    engine_version: str | None
    source: str
    source_sha256: str | None
    entry: str
    options: dict[str, EngineOption] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "engine_version": self.engine_version,
            "source": self.source,
            "source_sha256": self.source_sha256,
            "entry": self.entry,
            "method": METHOD,
            "options": {k: self.options[k].model_dump(exclude_none=True) for k in sorted(self.options)},
            "notes": self.notes,
        }


# --- the release, indexed -------------------------------------------------------------------------


@dataclass
class _Mod:
    name: str
    is_package: bool
    tree: ast.Module
    classes: dict[str, ast.ClassDef]
    functions: dict[str, ast.FunctionDef | ast.AsyncFunctionDef]
    imports: dict[str, tuple[str, str]]  # local name -> (module, name); name "" for a module import
    assigns: dict[str, ast.expr]  # module-level NAME = expr / NAME: T = expr / type NAME = expr
    star: list[str]  # modules of `from X import *`


def _imports_of(node: ast.stmt, current: str, is_package: bool) -> dict[str, tuple[str, str]]:
    out: dict[str, tuple[str, str]] = {}
    if isinstance(node, ast.ImportFrom):
        target = resolve_relative(current, is_package, node.level, node.module) if node.level else (node.module or "")
        for a in node.names:
            out[a.asname or a.name] = (target, a.name)
    elif isinstance(node, ast.Import):
        for a in node.names:
            if a.asname:
                out[a.asname] = (a.name, "")
            else:
                out[a.name.split(".")[0]] = (a.name.split(".")[0], "")
    return out


@dataclass(frozen=True)
class _ClassRef:
    module: str
    name: str


@dataclass(frozen=True)
class _ModuleRef:
    name: str


@dataclass(frozen=True)
class _FuncRef:
    module: str
    name: str
    node: ast.FunctionDef | ast.AsyncFunctionDef
    owner: _ClassRef | None = None  # the class that defines it (for super())
    bound: _ClassRef | None = None  # cls of a classmethod call


@dataclass(frozen=True)
class _External:
    """A name from outside the release (torch.dtype, typing.Literal, json.loads)."""

    module: str
    name: str


@dataclass
class _Parser:
    """The parser and its groups (one registry: a group's options are the parser's)."""

    options: dict[str, dict[str, Any]]
    #: prefixes whose inverse a ``--x/--no-x`` option also takes (vLLM 0.33: --enable-x also --disable-x)
    inverses: dict[str, str] = field(default_factory=dict)


@dataclass
class _Table:
    """``get_kwargs(<config class>)``: a field's argparse keywords, computed on first use."""

    cls: _ClassRef
    entries: dict[str, dict[str, Any]]


class _Scanner:
    def __init__(self, release: Release) -> None:
        self.release = release
        self._mods: dict[str, _Mod | None] = {}
        self._fields: dict[_ClassRef, dict[str, tuple[str, ast.expr]]] = {}
        self.notes: list[str] = []
        self.parsers: list[_Parser] = []

    def new_parser(self, cls: _ClassRef | None = None) -> _Parser:
        parser = _Parser({}, self.bool_inverses(cls) if cls is not None else {})
        self.parsers.append(parser)
        return parser

    def bool_inverses(self, cls: _ClassRef) -> dict[str, str]:
        """A parser class that registers its own action for BooleanOptionalAction
        (``self.register("action", BooleanOptionalAction, X)``) whose ``X._inverse_prefixes`` maps
        ``--enable-`` to ``--disable-``: the inverse spellings every such option also takes."""
        init = self.method(cls, "__init__")
        for node in ast.walk(init.node) if init else []:
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "register"):
                continue
            if len(node.args) != 3 or not (isinstance(node.args[0], ast.Constant) and node.args[0].value == "action"):
                continue
            if not isinstance(self.expr_ref(cls.module, node.args[1]), _External):
                continue
            action = self.expr_ref(cls.module, node.args[2])
            action_node = self.class_node(action) if isinstance(action, _ClassRef) else None
            for stmt in action_node.body if action_node else []:
                if (
                    isinstance(stmt, ast.Assign)
                    and any(isinstance(t, ast.Name) and t.id == "_inverse_prefixes" for t in stmt.targets)
                    and isinstance(stmt.value, ast.Dict)
                ):
                    pairs = zip(stmt.value.keys, stmt.value.values, strict=True)
                    consts = [(_constant(k) if k else None, _constant(v)) for k, v in pairs]
                    return {k: v for k, v in consts if isinstance(k, str) and isinstance(v, str)}
        return {}

    # -- modules and names ---------------------------------------------------------------------

    def module(self, name: str) -> _Mod | None:
        if name in self._mods:
            return self._mods[name]
        mod: _Mod | None = None
        base = name.replace(".", "/")
        for candidate, is_package in ((f"{base}.py", False), (f"{base}/__init__.py", True)):
            text = self.release.read(candidate)
            if text is None:
                continue
            try:
                tree = ast.parse(text)
            except SyntaxError:
                break
            mod = self._index(name, is_package, tree)
            break
        self._mods[name] = mod
        return mod

    @staticmethod
    def _index(name: str, is_package: bool, tree: ast.Module) -> _Mod:
        mod = _Mod(name, is_package, tree, {}, {}, {}, {}, [])

        def visit(body: list[ast.stmt]) -> None:
            for node in body:
                if isinstance(node, ast.ClassDef):
                    mod.classes[node.name] = node
                elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    mod.functions.setdefault(node.name, node)  # the first (overloads come before in stubs)
                elif isinstance(node, ast.Import | ast.ImportFrom):
                    for k, v in _imports_of(node, name, is_package).items():
                        if k == "*":
                            mod.star.append(v[0])
                        else:
                            mod.imports.setdefault(k, v)
                elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                    mod.assigns[node.targets[0].id] = node.value
                elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
                    mod.assigns[node.target.id] = node.value
                elif hasattr(ast, "TypeAlias") and isinstance(node, ast.TypeAlias):  # `type X = ...` (3.12)
                    mod.assigns[node.name.id] = node.value
                elif isinstance(node, ast.If | ast.Try):
                    visit(node.body)
                    for extra in getattr(node, "handlers", []) or []:
                        visit(extra.body)
                    visit(getattr(node, "orelse", []) or [])

        visit(tree.body)
        return mod

    def resolve(self, module: str, name: str, depth: int = 0) -> Any:
        """What ``name`` is in ``module``: a class, function, module, alias expression or external."""
        if depth > _DEPTH:
            return UNKNOWN
        mod = self.module(module)
        if mod is None:
            return _External(module, name) if not module.startswith("vllm") else UNKNOWN
        if name in mod.classes:
            return _ClassRef(module, name)
        if name in mod.functions:
            return _FuncRef(module, name, mod.functions[name])
        if name in mod.assigns:
            value = mod.assigns[name]
            if isinstance(value, ast.Name) and value.id != name:
                return self.resolve(module, value.id, depth + 1)
            return ("alias", module, value)
        if name in mod.imports:
            target, orig = mod.imports[name]
            return self._imported(target, orig, depth + 1)
        if mod.is_package and self.module(f"{module}.{name}") is not None:
            return _ModuleRef(f"{module}.{name}")
        for other in mod.star:
            if other.startswith("vllm") and name in self._names(other):
                return self.resolve(other, name, depth + 1)
        return UNKNOWN

    def _imported(self, target: str, orig: str, depth: int) -> Any:
        if not target.startswith("vllm"):
            return _ModuleRef(target) if not orig else _External(target, orig)
        if not orig:
            return _ModuleRef(target)
        if self.module(f"{target}.{orig}") is not None and (self.module(target) is None or orig not in self._names(target)):
            return _ModuleRef(f"{target}.{orig}")
        return self.resolve(target, orig, depth)

    def _names(self, module: str) -> set[str]:
        mod = self.module(module)
        if mod is None:
            return set()
        return set(mod.classes) | set(mod.functions) | set(mod.assigns) | set(mod.imports)

    def attribute(self, base: Any, attr: str) -> Any:
        if isinstance(base, _ModuleRef):
            if base.name.startswith("vllm"):
                return self.resolve(base.name, attr)
            return _External(base.name, attr)
        if isinstance(base, _ClassRef):
            found = self.method(base, attr)
            return found if found is not None else UNKNOWN
        if isinstance(base, _External):
            return _External(f"{base.module}.{base.name}", attr)
        return UNKNOWN

    # -- classes -------------------------------------------------------------------------------

    def class_node(self, ref: _ClassRef) -> ast.ClassDef | None:
        mod = self.module(ref.module)
        return mod.classes.get(ref.name) if mod else None

    def bases(self, ref: _ClassRef) -> list[Any]:
        node = self.class_node(ref)
        if node is None:
            return []
        out = []
        for b in node.bases:
            if isinstance(b, ast.Subscript):
                b = b.value
            out.append(self.expr_ref(ref.module, b))
        return out

    def mro(self, ref: _ClassRef, depth: int = 0) -> list[_ClassRef]:
        """The class and its bases in the release, depth first (enough for these single-inheritance configs)."""
        out = [ref]
        if depth > _DEPTH:
            return out
        for b in self.bases(ref):
            if isinstance(b, _ClassRef):
                out += [c for c in self.mro(b, depth + 1) if c not in out]
        return out

    def method(self, ref: _ClassRef, name: str, after: _ClassRef | None = None) -> _FuncRef | None:
        chain = self.mro(ref)
        if after is not None and after in chain:
            chain = chain[chain.index(after) + 1 :]
        for c in chain:
            node = self.class_node(c)
            if node is None:
                continue
            for stmt in node.body:
                if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef) and stmt.name == name:
                    return _FuncRef(c.module, name, stmt, owner=c, bound=ref)
        return None

    def is_dataclass(self, ref: _ClassRef) -> bool:
        node = self.class_node(ref)
        if node is None:
            return False
        for d in node.decorator_list:
            target = d.func if isinstance(d, ast.Call) else d
            name = target.attr if isinstance(target, ast.Attribute) else target.id if isinstance(target, ast.Name) else ""
            if name in ("dataclass", "config"):
                return True
        return False

    def is_dict_subclass(self, ref: _ClassRef) -> bool:
        for c in self.mro(ref):
            node = self.class_node(c)
            for b in node.bases if node else []:
                b = b.value if isinstance(b, ast.Subscript) else b
                name = b.attr if isinstance(b, ast.Attribute) else b.id if isinstance(b, ast.Name) else ""
                if name in ("dict", "Dict", "OrderedDict", "defaultdict"):
                    return True
                if name == "TypedDict":
                    return False
        return False

    def fields(self, ref: _ClassRef) -> dict[str, tuple[str, ast.expr]]:
        """A dataclass's fields, bases first: name -> (module of the annotation, annotation)."""
        if ref in self._fields:
            return self._fields[ref]
        out: dict[str, tuple[str, ast.expr]] = {}
        for c in reversed(self.mro(ref)):
            node = self.class_node(c)
            for stmt in node.body if node else []:
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                    ann = stmt.annotation
                    head = ann.value if isinstance(ann, ast.Subscript) else ann
                    head_name = head.attr if isinstance(head, ast.Attribute) else head.id if isinstance(head, ast.Name) else ""
                    if head_name in ("ClassVar", "InitVar") or (isinstance(ann, ast.Constant) and "ClassVar" in str(ann.value)):
                        continue
                    out[stmt.target.id] = (c.module, ann)
        self._fields[ref] = out
        return out

    def expr_ref(self, module: str, node: ast.expr) -> Any:
        if isinstance(node, ast.Name):
            if node.id in _BUILTIN:
                return _External("builtins", node.id)
            return self.resolve(module, node.id)
        if isinstance(node, ast.Attribute):
            return self.attribute(self.expr_ref(module, node.value), node.attr)
        return UNKNOWN

    # -- type annotations -> get_kwargs --------------------------------------------------------

    def hints(self, module: str, node: ast.expr | None, depth: int = 0) -> list[tuple[Any, ...]]:
        """``get_type_hints`` of vLLM's arg_utils on an annotation: the flattened members of a union,
        each ``("int",)``, ``("literal", values)``, ``("list", elem hints)``, ``("dataclass",)``,
        ``("dict",)``, ``("none",)``, ``("other",)``..."""
        if node is None or depth > _DEPTH:
            return [("other",)]
        if isinstance(node, ast.Constant):
            if node.value is None:
                return [("none",)]
            if isinstance(node.value, str):  # a string annotation
                try:
                    parsed = ast.parse(node.value, mode="eval").body
                except SyntaxError:
                    return [("other",)]
                return self.hints(module, parsed, depth + 1)
            return [("other",)]
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
            return self.hints(module, node.left, depth + 1) + self.hints(module, node.right, depth + 1)
        if isinstance(node, ast.Subscript):
            head = self.expr_ref(module, node.value)
            head_name = head.name if isinstance(head, _External) else ""
            if isinstance(head, _External) and head.name == "SkipValidation":  # pydantic: Annotated[X, SkipValidation()]
                return self.hints(module, node.slice, depth + 1)
            if isinstance(head, _External) and (head.module in _TYPING or head.module == "builtins"):
                args = list(node.slice.elts) if isinstance(node.slice, ast.Tuple) else [node.slice]
                if head_name == "Literal":
                    values = tuple(v for a in args for v in self.literal_values(module, a, depth + 1))
                    return [("literal", values)]
                if head_name in _UNION:
                    out = [h for a in args for h in self.hints(module, a, depth + 1)]
                    return [*out, ("none",)] if head_name == "Optional" else out
                if head_name == "Annotated":
                    return self.hints(module, args[0], depth + 1)
                if head_name in _LIST_LIKE:
                    kind = _LIST_LIKE[head_name]
                    count = None if kind != "tuple" or any(isinstance(a, ast.Constant) and a.value is Ellipsis for a in args) else len(args)
                    return [(kind, tuple(self.hints(module, args[0], depth + 1)), count)]
                if head_name in _DICT_LIKE:
                    return [("dict",)]
                if head_name == "type":
                    return [("other",)]
            return self.hints(module, node.value, depth + 1)
        ref = self.expr_ref(module, node) if isinstance(node, ast.Name | ast.Attribute) else UNKNOWN
        if isinstance(ref, _External):
            if ref.module == "builtins":
                if ref.name in _DICT_LIKE:
                    return [("dict",)]
                if ref.name in _LIST_LIKE:
                    return [(_LIST_LIKE[ref.name], (("other",),), None)]
                return [(ref.name,)] if ref.name in ("int", "float", "str", "bool") else [("other",)]
            if ref.name in _DICT_LIKE:
                return [("dict",)]
            return [("other",)]
        if isinstance(ref, tuple) and ref[0] == "alias":
            return self.hints(ref[1], ref[2], depth + 1)
        if isinstance(ref, _ClassRef):
            if self.is_dataclass(ref):
                return [("dataclass",)]
            if self.is_dict_subclass(ref):
                return [("dict",)]
            return [("other",)]
        return [("other",)]

    def literal_values(self, module: str, node: ast.expr, depth: int = 0) -> list[Any]:
        if isinstance(node, ast.Constant):
            return [node.value]
        if isinstance(node, ast.Tuple):
            return [v for e in node.elts for v in self.literal_values(module, e, depth + 1)]
        if depth < _DEPTH:  # Literal[OTHER_LITERAL_ALIAS, "x"]
            return [v for h in self.hints(module, node, depth + 1) if h[0] == "literal" for v in h[1]]
        return []

    def field_kwargs(self, module: str, annotation: ast.expr, name: str) -> dict[str, Any]:
        """``_compute_kwargs`` of vllm/engine/arg_utils.py, for one field (only what decides the value type)."""
        hints = self.hints(module, annotation)
        kinds = {h[0] for h in hints}
        kw: dict[str, Any] = {}
        if "dataclass" in kinds:
            kw["type"] = "json"
        elif kinds == {"bool", "str", "none"}:
            kw.update(type="str", nargs="?")
        elif "bool" in kinds:
            kw["action"] = "bool"
        elif "literal" in kinds:
            values = [v for h in hints if h[0] == "literal" for v in h[1]]
            kw["type"] = _scalar_of(values[0]) if values else "str"
            if "str" not in kinds:
                kw["choices"] = sorted(values, key=str)
        elif kinds & {"tuple", "list", "set"}:
            coll = next(h for h in hints if h[0] in ("tuple", "list", "set"))
            elem = list(coll[1])
            elem_kinds = {e[0] for e in elem}
            if len(elem_kinds) > 1 and "str" in elem_kinds:
                kw["type"] = "str"
            elif elem_kinds == {"literal"}:
                values = [v for e in elem for v in e[1]]
                kw["type"] = _scalar_of(values[0]) if values else "str"
                kw["choices"] = sorted(values, key=str)
            else:
                kw["type"] = _hint_scalar(elem[0]) if elem else "str"
            kw["nargs"] = coll[2] if coll[0] == "tuple" and coll[2] is not None else "+"
        elif "int" in kinds:
            kw["type"] = "int"
        elif "float" in kinds:
            kw["type"] = "float"
        elif "dict" in kinds:
            kw["type"] = "json"
        else:
            kw["type"] = "str"
        return kw

    def table_entry(self, table: _Table, key: str) -> dict[str, Any]:
        if key not in table.entries:
            fields = self.fields(table.cls)
            if key not in fields:
                self.notes.append(f"get_kwargs({table.cls.name}) has no field {key!r}")
                table.entries[key] = {"type": "str"}
            else:
                module, annotation = fields[key]
                table.entries[key] = self.field_kwargs(module, annotation, key)
        return table.entries[key]

    # -- the interpreter -----------------------------------------------------------------------

    def run_function(self, ref: _FuncRef, args: list[Any], kwargs: dict[str, Any], depth: int) -> Any:
        if depth > _DEPTH:
            return UNKNOWN
        params = ref.node.args
        names = [a.arg for a in params.posonlyargs + params.args]
        env: dict[str, Any] = {}
        is_classmethod = any(isinstance(d, ast.Name) and d.id == "classmethod" for d in ref.node.decorator_list)
        if is_classmethod and names:
            env[names[0]] = ref.bound or ref.owner
            names = names[1:]
        elif ref.owner is not None and names and names[0] == "self":
            env["self"] = UNKNOWN
            names = names[1:]
        defaults = params.defaults
        for i, n in enumerate(names):
            if i < len(args):
                env[n] = args[i]
            elif n in kwargs:
                env[n] = kwargs[n]
            else:
                j = i - (len(names) - len(defaults))
                env[n] = _constant(defaults[j]) if 0 <= j < len(defaults) else UNKNOWN
        frame = _Frame(self, ref.module, env, ref, depth)
        return frame.block(ref.node.body)


class _Return(Exception):
    def __init__(self, value: Any) -> None:
        self.value = value


class _Frame:
    def __init__(self, scanner: _Scanner, module: str, env: dict[str, Any], func: _FuncRef | None, depth: int) -> None:
        self.s = scanner
        self.module = module
        self.env = env
        self.func = func
        self.depth = depth

    def block(self, body: list[ast.stmt]) -> Any:
        try:
            for stmt in body:
                self.stmt(stmt)
        except _Return as r:
            return r.value
        return UNKNOWN

    def stmt(self, node: ast.stmt) -> None:
        if isinstance(node, ast.Return):
            raise _Return(self.eval(node.value) if node.value is not None else None)
        if isinstance(node, ast.Import | ast.ImportFrom):
            mod = self.s.module(self.module)
            for k, (source, orig) in _imports_of(node, self.module, bool(mod and mod.is_package)).items():
                self.env[k] = self.s._imported(source, orig, 0)
        elif isinstance(node, ast.Assign):
            value = self.eval(node.value)
            for target in node.targets:
                self.assign(target, value)
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            self.assign(node.target, self.eval(node.value))
        elif isinstance(node, ast.AugAssign) and isinstance(node.op, ast.Add):
            current = self.eval(node.target)
            extra = self.eval(node.value)
            if isinstance(current, list) and isinstance(extra, list):
                current.extend(extra)
        elif isinstance(node, ast.Delete):
            for target in node.targets:
                if isinstance(target, ast.Subscript):
                    container, key = self.eval(target.value), self.eval(target.slice)
                    if isinstance(container, dict) and isinstance(key, str):
                        container.pop(key, None)
        elif isinstance(node, ast.Expr):
            self.eval(node.value)
        elif isinstance(node, ast.If):
            # the branch a plain `python -m <entry>` takes: the body (vLLM guards only help output
            # and sub-command variants with `if`); names the test cannot settle take the body too
            test = self.eval(node.test)
            self.block_no_return(node.body if test is not False else node.orelse)
        elif isinstance(node, ast.For):
            self.loop(node)
        elif isinstance(node, ast.With | ast.Try):
            self.block_no_return(node.body)

    def block_no_return(self, body: list[ast.stmt]) -> None:
        for stmt in body:
            self.stmt(stmt)

    def loop(self, node: ast.For) -> None:
        it = node.iter
        items: list[Any] = []
        if isinstance(it, ast.Call) and isinstance(it.func, ast.Attribute) and it.func.attr == "items" and not it.args:
            table = self.eval(it.func.value)
            if isinstance(table, _Table):
                items = [(k, self.s.table_entry(table, k)) for k in self.s.fields(table.cls)]
            elif isinstance(table, dict):
                items = list(table.items())
        else:
            seq = self.eval(it)
            if isinstance(seq, list | tuple):
                items = list(seq)
        for item in items:
            self.assign(node.target, item)
            self.block_no_return(node.body)

    def assign(self, target: ast.expr, value: Any) -> None:
        if isinstance(target, ast.Name):
            self.env[target.id] = value
        elif isinstance(target, ast.Tuple) and isinstance(value, tuple) and len(value) == len(target.elts):
            for t, v in zip(target.elts, value, strict=True):
                self.assign(t, v)
        elif isinstance(target, ast.Subscript):
            container, key = self.eval(target.value), self.eval(target.slice)
            if isinstance(container, dict) and isinstance(key, str):
                container[key] = _keyword(key, value)

    # -- expressions ---------------------------------------------------------------------------

    def eval(self, node: ast.expr | None) -> Any:
        if node is None:
            return None
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            if node.id in self.env:
                return self.env[node.id]
            if node.id in _BUILTIN:
                return _External("builtins", node.id)
            found = self.s.resolve(self.module, node.id)
            if isinstance(found, tuple) and isinstance(found[2], ast.Constant):  # a module constant
                return found[2].value
            return found
        if isinstance(node, ast.Attribute):
            return self.s.attribute(self.eval(node.value), node.attr)
        if isinstance(node, ast.Subscript):
            container, key = self.eval(node.value), self.eval(node.slice)
            if isinstance(container, _Table) and isinstance(key, str):
                return self.s.table_entry(container, key)
            if isinstance(container, dict) and isinstance(key, str):
                return container.get(key, UNKNOWN)
            return UNKNOWN
        if isinstance(node, ast.List | ast.Tuple | ast.Set):
            return [self.eval(e) for e in node.elts]
        if isinstance(node, ast.Dict):  # {**kw["x"], "default": None}
            out: dict[str, Any] = {}
            for k, v in zip(node.keys, node.values, strict=True):
                value = self.eval(v)
                if k is None:
                    if isinstance(value, dict):
                        out.update(copy.deepcopy(value))
                else:
                    key = self.eval(k)
                    if isinstance(key, str):
                        out[key] = _keyword(key, value)
            return out
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            left, right = self.eval(node.left), self.eval(node.right)
            if isinstance(left, list):  # choices=[...] + (platform-dependent extras): the known part
                return left + [v for v in right if isinstance(v, str | int)] if isinstance(right, list) else left
            if isinstance(left, str) and isinstance(right, str):
                return left + right
            return UNKNOWN
        if isinstance(node, ast.IfExp):
            test = self.eval(node.test)
            return self.eval(node.orelse if test is False else node.body)
        if isinstance(node, ast.JoinedStr):
            parts = []
            for v in node.values:
                value = self.eval(v.value) if isinstance(v, ast.FormattedValue) else self.eval(v)
                if not isinstance(value, str):
                    return UNKNOWN
                parts.append(value)
            return "".join(parts)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            value = self.eval(node.operand)
            return (not value) if isinstance(value, bool) else UNKNOWN
        if isinstance(node, ast.Call):
            return self.call(node)
        return UNKNOWN

    def call(self, node: ast.Call) -> Any:
        func = node.func
        plain = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
        if plain in ("optional_type", "parse_type") and node.args:  # a wrapper: the value type is its argument's
            return _CallOf(_type_kind(self.eval(node.args[0])))
        if isinstance(func, ast.Attribute):
            owner = self.eval(func.value)
            name = func.attr
            if isinstance(owner, _Parser):
                if name == "add_argument":
                    self.add_argument(owner, node)
                    return UNKNOWN
                if name in ("add_argument_group", "add_mutually_exclusive_group"):
                    return owner
                return UNKNOWN
            if isinstance(owner, str) and name == "replace" and len(node.args) == 2:
                a, b = self.eval(node.args[0]), self.eval(node.args[1])
                return owner.replace(a, b) if isinstance(a, str) and isinstance(b, str) else UNKNOWN
            if isinstance(owner, dict) and name == "pop" and node.args:
                key = self.eval(node.args[0])
                default = self.eval(node.args[1]) if len(node.args) > 1 else UNKNOWN
                return owner.pop(key, default) if isinstance(key, str) else UNKNOWN
            if isinstance(owner, list) and name == "remove" and node.args:
                value = self.eval(node.args[0])
                if value in owner:
                    owner.remove(value)
                return UNKNOWN
            if isinstance(owner, list) and name in ("append", "extend") and node.args:
                value = self.eval(node.args[0])
                owner.extend(value if name == "extend" and isinstance(value, list) else [value])
                return UNKNOWN
            if isinstance(func.value, ast.Call) and isinstance(func.value.func, ast.Name) and func.value.func.id == "super":
                if self.func is not None and self.func.owner is not None:
                    target = self.s.method(self.func.bound or self.func.owner, name, after=self.func.owner)
                    if target is not None:
                        return self.invoke(target, node)
                return UNKNOWN
            callee = self.s.attribute(owner, name) if not isinstance(owner, _FuncRef) else UNKNOWN
        else:
            callee = self.eval(func)
        if isinstance(callee, _External):
            if callee.name in ("FlexibleArgumentParser", "ArgumentParser"):
                return self.s.new_parser()
            if callee.name == "get_args" and node.args:  # get_args(SomeLiteral): its values
                return self.literal_list(node.args[0])
            return UNKNOWN
        if isinstance(callee, _ClassRef):
            if callee.name in ("FlexibleArgumentParser", "ArgumentParser"):
                return self.s.new_parser(callee)
            return UNKNOWN
        if isinstance(callee, _FuncRef):
            if callee.name == "get_kwargs" and node.args:
                cls = self.eval(node.args[0])
                return _Table(cls, {}) if isinstance(cls, _ClassRef) else UNKNOWN
            if callee.name == "get_args" and node.args:
                return self.literal_list(node.args[0])
            return self.invoke(callee, node)
        return UNKNOWN

    def literal_list(self, arg: ast.expr) -> Any:
        values = [v for h in self.s.hints(self.module, arg) if h[0] == "literal" for v in h[1]]
        return values or UNKNOWN

    def invoke(self, callee: _FuncRef, node: ast.Call) -> Any:
        args = [self.eval(a) for a in node.args if not isinstance(a, ast.Starred)]
        kwargs = {k.arg: self.eval(k.value) for k in node.keywords if k.arg}
        if not any(isinstance(a, _Parser | _Table | dict) for a in [*args, *kwargs.values()]) and callee.name not in ("main",):
            return UNKNOWN  # only follow what builds or edits the parser
        return self.s.run_function(callee, args, kwargs, self.depth + 1)

    def add_argument(self, parser: _Parser, node: ast.Call) -> None:
        strings: list[str] = []
        for a in node.args:
            value = self.eval(a.value if isinstance(a, ast.Starred) else a)
            values = value if isinstance(a, ast.Starred) and isinstance(value, list) else [value]
            strings += [v for v in values if isinstance(v, str)]
        kw: dict[str, Any] = {}
        for k in node.keywords:
            if k.arg is None:
                spread = self.eval(k.value)
                if isinstance(spread, dict):
                    kw.update(copy.deepcopy(spread))
                else:
                    self.s.notes.append(f"{'/'.join(strings)}: keywords not read ({ast.unparse(k.value)})")
            else:
                kw[k.arg] = _keyword(k.arg, self.eval(k.value))
        flags = kw.pop("flags", None)
        if isinstance(flags, list):
            strings = [f for f in flags if isinstance(f, str)] + strings
        if not any(s.startswith("-") for s in strings):
            return  # a positional (model_tag): not a flag
        parser.options.setdefault(" ".join(strings), {"strings": strings, **kw})


def _constant(node: ast.expr) -> Any:
    return node.value if isinstance(node, ast.Constant) else UNKNOWN


def _scalar_of(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    return "str"


def _hint_scalar(hint: tuple[Any, ...]) -> str:
    return {"int": "int", "float": "float", "dataclass": "json", "dict": "json"}.get(hint[0], "str")


def _keyword(key: str, value: Any) -> Any:
    """An ``add_argument`` keyword as the scanner keeps it: types and actions by kind."""
    if key == "type":
        return _type_kind(value)
    if key == "action":
        if value in ("store_true", "store_false", "store_const", "count"):
            return "flag"
        if value in ("append", "extend"):
            return "append"
        if isinstance(value, _External) and value.name == "BooleanOptionalAction":
            return "bool"
        if isinstance(value, str):
            return value
        return "custom"  # an Action class of the release: keeps type and nargs
    if key == "choices":
        return list(value) if isinstance(value, list | tuple) else None
    return value


def _type_kind(value: Any) -> str:
    if isinstance(value, str) and value in ("int", "float", "str", "json"):
        return value
    if isinstance(value, _External):
        if value.module == "builtins" and value.name in ("int", "float"):
            return value.name
        if value.name in _JSON_PARSERS:
            return "json"
        return "str"
    if isinstance(value, _FuncRef):
        if value.name.startswith("human_readable_int"):
            return "int"
        if value.name in _JSON_PARSERS:
            return "json"
        if value.name in ("optional_type", "parse_type"):
            return "str"
        return "str"
    if isinstance(value, _CallOf):
        return value.kind
    return "str"


@dataclass(frozen=True)
class _CallOf:
    kind: str


def _option(spec: dict[str, Any], inverses: dict[str, str]) -> tuple[str, EngineOption] | None:
    strings: list[str] = list(spec["strings"])
    if spec.get("action") == "bool":
        strings += [inverse + s.removeprefix(prefix) for s in list(strings) for prefix, inverse in inverses.items() if s.startswith(prefix)]
    longs = [s for s in strings if s.startswith("--")]
    if not longs:
        return None
    name = longs[0][2:]
    action = spec.get("action")
    nargs = spec.get("nargs")
    if action == "bool":
        kind = "bool"
    elif action == "flag":
        kind = "flag"
    else:
        base = spec.get("type")
        kind = base if isinstance(base, str) else "str"
        if action == "append" or nargs in ("+", "*") or isinstance(nargs, int):
            kind = f"list[{kind}]"
        elif nargs == "?":
            kind = f"optional[{kind}]"
    choices = spec.get("choices")
    dest = spec.get("dest")
    aliases = tuple(s for s in strings if s != longs[0])
    return name, EngineOption(
        type=kind,
        choices=tuple(sorted(str(c) for c in choices if c is not None)) if isinstance(choices, list) and kind != "bool" else None,
        dest=dest if isinstance(dest, str) and dest != name.replace("-", "_") else None,
        aliases=aliases or None,
    )


def scan_options(path: str | Path, entry: str = ENTRY_MODULE) -> OptionsScan:
    """The option list of ``entry``'s parser in a vLLM wheel or source tree."""
    release = Release(Path(path))
    scanner = _Scanner(release)
    mod = scanner.module(entry)
    if mod is None:
        raise ScanError(f"{path}: no module {entry} (not a vLLM wheel or source tree)")
    main_block: list[ast.stmt] = []
    for node in mod.tree.body:
        if (
            isinstance(node, ast.If)
            and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name)
            and node.test.left.id == "__name__"
        ):
            main_block = node.body
    if not main_block:
        raise ScanError(f"{path}: {entry} has no `if __name__ == \"__main__\"` block to read the parser from")
    _Frame(scanner, entry, {}, None, 0).block(main_block)
    parsers = scanner.parsers
    if not parsers or not parsers[0].options:
        raise ScanError(f"{path}: found no add_argument calls behind {entry}'s parser")
    result = OptionsScan(engine_version=release.version(), source=Path(path).name, source_sha256=release.sha256(), entry=entry)
    for spec in parsers[0].options.values():
        opt = _option(spec, parsers[0].inverses)
        if opt is not None and opt[0] not in result.options and opt[0] != "help":
            result.options[opt[0]] = opt[1]
    result.notes = sorted(set(scanner.notes))
    return result


def load_scan(path: str | Path) -> OptionsScan:
    """A scan written before (``--output`` or a fixture of tests/fixtures/engine_options/)."""
    try:
        data = json.loads(Path(path).read_text())
        options = {k: EngineOption.model_validate(v) for k, v in data["options"].items()}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ScanError(f"{path}: not a scan of llmfleet.options_scan ({exc})") from exc
    return OptionsScan(data.get("engine_version"), data["source"], data.get("source_sha256"), data.get("entry", ENTRY_MODULE),
                       options, list(data.get("notes") or []))


def source_line(scan: OptionsScan) -> str:
    digest = f" (sha256 {scan.source_sha256})" if scan.source_sha256 else ""
    return f"llmfleet.options_scan of {scan.source}{digest}: the parser of python -m {scan.entry}"


def scan_wheelhouse(wheelhouse: Path, distribution: str, version: str) -> OptionsScan | None:
    """The scan of a runtime's own engine wheel in its wheelhouse (``tools/pin.py runtime`` downloads
    it), or None when the wheelhouse does not hold it."""
    wheels = sorted(wheelhouse.glob(f"{distribution.replace('-', '_')}-{version}-*.whl"))
    return scan_options(wheels[0]) if wheels else None


def recorded(scan: OptionsScan) -> dict[str, Any]:
    """The lock fields of a runtime pin that record a scan."""
    return {"engine_options": dict(sorted(scan.options.items())), "engine_options_source": source_line(scan)}


def pin(scan: OptionsScan, key: str, lock_file: str | Path | None = None) -> bool:
    """Record the scan in the lock as runtime ``key``'s option list; False when it already holds it."""
    from .artifacts.lockfile import lock_path, read_lock, with_runtime, write_lock

    path = lock_path(lock_file)
    lock = read_lock(path)
    runtime = lock.runtimes.get(key)
    if runtime is None:
        raise ScanError(f"runtime {key} is not in {path} (known: {', '.join(sorted(lock.runtimes)) or 'none'})")
    if scan.engine_version and scan.engine_version != runtime.vllm_version:
        raise ScanError(f"{scan.source} is vLLM {scan.engine_version}, runtime {key} pins vLLM {runtime.vllm_version}")
    updated = runtime.model_copy(update=recorded(scan))
    return write_lock(path, with_runtime(lock, key, updated))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="options_scan", description="List the options of a vLLM release's API server, statically.")
    p.add_argument("source", help="a vLLM wheel (.whl) or source tree, or a scan written before (.json)")
    p.add_argument("--entry", default=ENTRY_MODULE, help=f"the module run with python -m (default {ENTRY_MODULE})")
    p.add_argument("--pin", metavar="RUNTIME", help="record the option list in the lock as this runtime's")
    p.add_argument("--lock", metavar="FILE", help="the lock to write (default: $LLMFLEET_LOCK or pins/lock.json)")
    args = p.parse_args(argv)
    try:
        result = load_scan(args.source) if args.source.endswith(".json") else scan_options(args.source, args.entry)
        if args.pin:
            changed = pin(result, args.pin, args.lock)
            print(f"runtime {args.pin}: {len(result.options)} options {'recorded' if changed else 'already recorded'}", file=sys.stderr)
            return 0
    except ScanError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result.to_dict(), indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
