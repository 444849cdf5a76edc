"""``engine_args``: the extra engine flags an instance passes, checked against the pinned engine.

An instance may add flags to vLLM's command line. vLLM's parser (argparse) takes any unique prefix
of an option and the last value given wins, so a flag is checked against the option list of the
pinned engine itself (``RuntimePin.engine_options``, read from the release when it is pinned:
:mod:`llmfleet.options_scan`), never against a few names:

* the name, with underscores as dashes, must be an option exactly as the parser spells it (an
  abbreviation or another spelling is refused, and names the option meant);
* the option must not be one llmfleet sets itself (``catalog/engine_args.yml`` ``managed``, by
  the option's dest), nor a prefix of one;
* an option that loads code or data from outside the pins, opens another listener, writes prompts
  into the journal or takes a JSON object is refused unless the instance's model pin allows it
  (``ModelPin.allow_engine_args``; the plan then carries a warning);
* the value must be of the option's type (a switch takes ``true``, ``--x/--no-x`` a boolean, a
  number a number, choices one of them);
* every flag is rendered ``--flag=value`` (``--flag`` / ``--no-flag`` for booleans): a value is
  never read as another option.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import yaml

from .pins import EngineOption, ModelPin, RuntimePin

NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
#: characters a string value may hold: printable, no control characters (a newline in argv is legal
#: but says a value was pasted wrongly)
_VALUE_RE = re.compile(r"^[^\x00-\x1f\x7f]*$")


@dataclass(frozen=True)
class Policy:
    managed: dict[str, str]
    refused: dict[str, tuple[str, str]]  # dest -> (group, why)
    patterns: tuple[tuple[re.Pattern[str], str, str], ...]  # (regex, group, why)
    json_why: str


@cache
def policy() -> Policy:
    data = yaml.safe_load(resources.files("llmfleet.catalog").joinpath("engine_args.yml").read_text())
    groups = data["refused"]
    refused = {name: (group, spec["why"]) for group, spec in groups.items() for name in spec["names"]}
    patterns = tuple(
        (re.compile(p["match"]), p["group"], p.get("why") or groups[p["group"]]["why"]) for p in data.get("patterns") or []
    )
    return Policy(dict(data["managed"]), refused, patterns, data["json"]["why"])


@dataclass(frozen=True)
class Finding:
    """One problem with one engine arg: ``where`` is relative to the instance (``engine_args.<name>``)."""

    where: str
    value: Any
    message: str
    valid: str
    severity: str = "error"


def _dest(name: str, opt: EngineOption) -> str:
    return opt.dest or name.replace("-", "_")


def _spellings(name: str, opt: EngineOption) -> list[str]:
    """Every option string of one option (long forms without the leading dashes)."""
    out = [name, *(a[2:] for a in opt.aliases or () if a.startswith("--"))]
    if opt.type == "bool":
        out.append("no-" + name)
    return out


def _managed_strings(options: Mapping[str, EngineOption], managed: Mapping[str, str]) -> dict[str, str]:
    """Each spelling of a managed option -> its dest (``host`` and a release's own aliases)."""
    out = {name.replace("_", "-"): name for name in managed}
    for name, opt in options.items():
        dest = _dest(name, opt)
        if dest in managed:
            out.update({s: dest for s in _spellings(name, opt)})
    return out


def _refusal(dest: str, opt: EngineOption, pol: Policy) -> tuple[str, str] | None:
    """(group, why) when the option is refused by default."""
    if dest in pol.refused:
        return pol.refused[dest]
    for regex, group, why in pol.patterns:
        if regex.search(dest):
            return group, why
    if opt.type == "json" or opt.type.endswith("[json]"):
        return "json", pol.json_why
    return None


def _type_error(value: Any, opt: EngineOption) -> str | None:
    """Why ``value`` does not fit the option, or None."""
    kind = opt.type
    inner = kind[kind.index("[") + 1 : -1] if "[" in kind else kind
    if kind == "bool":
        return None if isinstance(value, bool) else "takes true or false (--x / --no-x)"
    if kind == "flag":
        return None if value is True else "is a switch without a value or an off form: true, or leave it out"
    if isinstance(value, bool):
        return f"takes a{'n' if inner == 'int' else ''} {_KIND_WORDS[inner]}, not a boolean"
    if inner == "int" and not isinstance(value, int):
        return "takes an integer"
    if inner == "float" and (not isinstance(value, int | float) or not math.isfinite(value)):
        return "takes a number"
    if inner == "json":
        if not isinstance(value, str):
            return "takes a JSON object as a string"
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as exc:
            return f"is not valid JSON ({exc.msg})"
        if not isinstance(parsed, dict):
            return "takes a JSON object"
    if isinstance(value, str) and not _VALUE_RE.match(value):
        return "holds a control character (a newline?)"
    if opt.choices is not None and str(value) not in opt.choices:
        return "is not one of the engine's choices"
    return None


_KIND_WORDS = {"int": "integer", "float": "number", "str": "string", "json": "JSON object"}


def _valid_for(opt: EngineOption) -> str:
    if opt.choices is not None:
        return "one of " + ", ".join(opt.choices)
    kind = opt.type
    if kind == "bool":
        return "true or false"
    if kind == "flag":
        return "true"
    inner = kind[kind.index("[") + 1 : -1] if "[" in kind else kind
    words = {"int": "an integer", "float": "a number", "str": "a string", "json": "a JSON object (as a string)"}[inner]
    return f"{words} (one value)" if kind.startswith("list[") else words


def check(
    engine_args: Mapping[str, Any],
    runtime_key: str,
    runtime: RuntimePin,
    model_key: str | None,
    model: ModelPin | None,
) -> list[Finding]:
    """Every problem with an instance's ``engine_args`` (errors), and what a pin allowed (warnings)."""
    findings: list[Finding] = []
    if not engine_args:
        return findings
    pol = policy()
    engine = f"vLLM {runtime.vllm_version} ({runtime_key})"
    options = runtime.engine_options
    if options is None:
        for name, value in engine_args.items():
            findings.append(
                Finding(
                    f"engine_args.{name}",
                    value,
                    f"cannot be checked: runtime {runtime_key} records no option list of its engine",
                    "pin the runtime with its option list (python -m llmfleet.options_scan WHEEL --pin KEY), or no engine_args",
                )
            )
        return findings
    managed = _managed_strings(options, pol.managed)
    allowed = set(model.allow_engine_args or ()) if model is not None else set()
    known = {s: name for name, opt in options.items() for s in _spellings(name, opt)}
    for name in sorted(engine_args):
        value = engine_args[name]
        where = f"engine_args.{name}"
        if not NAME_RE.match(name):
            findings.append(Finding("engine_args", name, "is not a vLLM flag name", "snake_case, e.g. enforce_eager"))
            continue
        flag = name.replace("_", "-")
        if flag in managed:
            dest = managed[flag]
            findings.append(Finding(where, value, "is set by llmfleet", f"use {pol.managed[dest]}"))
            continue
        cut = sorted({d for s, d in managed.items() if s.startswith(flag)})
        if cut:
            findings.append(
                Finding(
                    where,
                    value,
                    f"abbreviates --{cut[0].replace('_', '-')}, which llmfleet sets (vLLM's parser takes any unique prefix)",
                    f"use {pol.managed[cut[0]]}",
                )
            )
            continue
        opt = options.get(flag)
        if opt is None:
            if flag in known:
                canonical = known[flag]
                spelled = f"is another spelling of --{canonical} in {engine}"
                findings.append(Finding(where, value, spelled, canonical.replace("-", "_")))
                continue
            close = difflib.get_close_matches(flag, list(options), n=3, cutoff=0.75)
            prefixed = sorted(o for o in options if o.startswith(flag))[:3]
            hint = ", ".join(o.replace("-", "_") for o in (prefixed or close)) or "an option of `vllm serve --help`"
            what = "abbreviates an option: the full name is needed" if prefixed else "is not an option"
            findings.append(Finding(where, value, f"{what} of {engine}", hint))
            continue
        dest = _dest(flag, opt)
        if dest in pol.managed:
            findings.append(Finding(where, value, "is set by llmfleet", f"use {pol.managed[dest]}"))
            continue
        refusal = _refusal(dest, opt, pol)
        if refusal is not None:
            group, why = refusal
            if name in allowed or dest in allowed:
                findings.append(
                    Finding(where, value, f"allowed by the model pin {model_key} though it {why}", "", severity="warning")
                )
            else:
                findings.append(
                    Finding(where, value, f"{why} ({group})", "leave it out, or allow it in the model pin's allow_engine_args")
                )
                continue
        problem = _type_error(value, opt)
        if problem is not None:
            findings.append(Finding(where, value, problem, _valid_for(opt)))
    return findings


def render(name: str, value: Any, opt: EngineOption) -> str:
    """One engine arg as one argv element: ``--flag=value``, or ``--flag`` / ``--no-flag``."""
    flag = "--" + name.replace("_", "-")
    if opt.type in ("bool", "flag"):
        return flag if value else "--no-" + flag[2:]
    if isinstance(value, float) and value.is_integer() and "float" not in opt.type:
        value = int(value)
    return f"{flag}={value}"
