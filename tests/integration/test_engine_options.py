"""The static option scan of the pinned CPU wheel equals the parser the runtime itself builds.

``llmfleet.options_scan`` reads the release without importing it; here the pinned runtime's own
Python imports vLLM, builds the API server's parser (``make_arg_parser``) and lists every option
with its type the way the scan records it. Both must agree option for option, and the lock must
hold that list: the planner checks ``engine_args`` against it.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from llmfleet.artifacts.cache import cache_root
from llmfleet.options_scan import scan_options
from llmfleet.pins import Lock

pytestmark = pytest.mark.integration

#: runs in the runtime's virtualenv: the server's parser, each option as options_scan records it
DUMP = r"""
import argparse, importlib, json, sys
for path in ("vllm.entrypoints.common.cli_args", "vllm.entrypoints.launchers.cli_args", "vllm.entrypoints.openai.cli_args"):
    try:
        make_arg_parser = importlib.import_module(path).make_arg_parser
        break
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith("vllm.entrypoints"):
            raise
from vllm.utils.argparse_utils import FlexibleArgumentParser

def base(t):
    for _ in range(5):  # optional_type(parse_type(X)) wrap X in closures
        if getattr(t, "__name__", "") not in ("_optional_type", "_parse_type"):
            break
        t = next((c.cell_contents for c in t.__closure__ or () if callable(c.cell_contents)), None)
    return t

def scalar(t):
    t, name = base(t), getattr(base(t), "__name__", "")
    if t is int or name.startswith("human_readable_int"):
        return "int"
    if t is float:
        return "float"
    return "json" if name in ("loads", "union_dict_and_str", "parse_dataclass") else "str"

out = {}
for a in make_arg_parser(FlexibleArgumentParser())._actions:
    if isinstance(a, argparse._HelpAction) or not a.option_strings:
        continue
    if isinstance(a, argparse.BooleanOptionalAction):
        kind = "bool"
    elif isinstance(a, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._StoreConstAction)):
        kind = "flag"
    else:
        kind = scalar(a.type)
        if isinstance(a, argparse._AppendAction) or a.nargs in ("+", "*") or isinstance(a.nargs, int):
            kind = f"list[{kind}]"
        elif a.nargs == "?":
            kind = f"optional[{kind}]"
    name = next(o for o in a.option_strings if o.startswith("--"))[2:]
    rec = {"type": kind}
    if a.choices:
        rec["choices"] = sorted(str(c) for c in a.choices if c is not None)
    if a.dest != name.replace("-", "_"):
        rec["dest"] = a.dest
    aliases = [o for o in a.option_strings if o not in ("--" + name, "--no-" + name)]
    if aliases:
        rec["aliases"] = aliases
    out[name] = rec
json.dump(out, sys.stdout)
"""


def test_scan_of_the_wheel_equals_the_runtime_s_own_parser(lock: Lock, runtime_key: str, runtime_venv: Path) -> None:
    pin = lock.runtimes[runtime_key]
    wheels = sorted((cache_root() / "wheelhouse" / runtime_key).glob(f"{pin.distribution.replace('-', '_')}-{pin.version}-*.whl"))
    assert wheels, f"no {pin.distribution} {pin.version} wheel in the wheelhouse of {runtime_key}"
    proc = subprocess.run([str(runtime_venv / "bin" / "python"), "-c", DUMP], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runtime = json.loads(proc.stdout)
    scan = scan_options(wheels[0]).options
    scanned = {k: json.loads(v.model_dump_json(exclude_none=True)) for k, v in scan.items()}
    print(f"\n{runtime_key}: the runtime's parser has {len(runtime)} options, the scan of {wheels[0].name} {len(scanned)}")
    assert sorted(scanned) == sorted(runtime)
    assert {k: v for k, v in scanned.items() if v != runtime[k]} == {}
    assert pin.engine_options == dict(sorted(scan.items())), "the lock's option list is not the release's: pin it again"
