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


#: runs in the runtime's virtualenv: the server's own parser on an argv, the values it ends with
PARSE = r"""
import importlib, json, sys
for path in ("vllm.entrypoints.common.cli_args", "vllm.entrypoints.launchers.cli_args", "vllm.entrypoints.openai.cli_args"):
    try:
        make_arg_parser = importlib.import_module(path).make_arg_parser
        break
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith("vllm.entrypoints"):
            raise
from vllm.utils.argparse_utils import FlexibleArgumentParser
args = make_arg_parser(FlexibleArgumentParser()).parse_args(json.loads(sys.argv[1]))
keys = ("host", "port", "api_key", "trust_remote_code", "max_num_seqs", "enforce_eager", "enable_prefix_caching", "kv_cache_dtype",
        "reasoning_parser", "served_model_name", "max_model_len")
print(json.dumps({k: getattr(args, k, None) for k in keys}, default=str))
"""


def test_the_plan_s_argv_means_to_the_engine_what_the_plan_says(lock: Lock, runtime_key: str, runtime_venv: Path) -> None:
    """The engine's own parser reads the planned argv, engine args rendered --flag=value included, as
    the plan means it: its bind, port and no key; a value that looks like a flag stays a value."""
    from llmfleet.inventory import load_inventory
    from llmfleet.plan import evaluate_host

    host_vars = load_inventory(Path(__file__).resolve().parents[2] / "inventory" / "lab")["lab1"]
    host_vars["llmfleet_runtime"] = runtime_key
    host_vars["llmfleet_instances"][0]["engine_args"] = {
        "max_num_seqs": 8, "enforce_eager": True, "enable_prefix_caching": False, "kv_cache_dtype": "auto",
        "reasoning_parser": "--host=0.0.0.0",
    }  # fmt: skip
    inst = evaluate_host("lab1", host_vars, lock)["instances"][0]
    argv = inst["argv"][3:]  # after <python> -m <module>
    proc = subprocess.run([str(runtime_venv / "bin" / "python"), "-c", PARSE, json.dumps(argv)], capture_output=True, text=True,
                          timeout=300, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["host"] == inst["bind"] == "127.0.0.1" and got["port"] == inst["port"] and got["api_key"] is None
    assert got["trust_remote_code"] is False and got["served_model_name"] == [inst["served_model_name"]]
    assert got["max_num_seqs"] == 8 and got["enforce_eager"] is True and got["enable_prefix_caching"] is False
    assert got["kv_cache_dtype"] == "auto" and got["reasoning_parser"] == "--host=0.0.0.0"
    assert got["max_model_len"] == inst["max_model_len"]
