"""A ``pynvml`` that replays NVML's raw answers recorded on a real GPU (tests/fixtures/gpu/*-nvml-raw.json).

``tests/fixtures/gpu/nvml_raw_dump.py`` wrote those answers on the machine, without the facts module:
each call's arguments and the value NVML gave or the error it raised. Here every binding the module
calls looks its answer up by (function, arguments); a structure comes back with its recorded fields,
an error as an ``NVMLError`` with NVML's code. A call that was not recorded fails the test: the
module may not ask NVML something the dump does not show an answer to.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "gpu"


class NVMLError(Exception):
    def __init__(self, value: int | None, text: str = ""):
        super().__init__(text or f"NVML error {value}")
        self.value = value


class Handle:
    def __init__(self, index: int):
        self.index = index


class NotRecorded(AssertionError):
    """The module asked NVML something the raw dump has no answer for."""


def raw(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / name).read_text())
    return data


def _key(arg: Any) -> Any:
    return f"gpu:{arg.index}" if isinstance(arg, Handle) else arg


def _value(answer: Any) -> Any:
    if isinstance(answer, dict) and "struct" in answer:
        return SimpleNamespace(**{k: v for k, v in answer.items() if k != "struct"})
    return copy.deepcopy(answer)


class ReplayNvml:
    NVMLError = NVMLError

    def __init__(self, dump: dict[str, Any]):
        self.answers: dict[tuple[str, str], dict[str, Any]] = {}
        for call in dump["calls"]:
            self.answers[(call["fn"], json.dumps(call["args"]))] = call
        self.asked: list[str] = []

    def __getattr__(self, fn: str) -> Any:
        if not fn.startswith("nvml"):
            raise AttributeError(fn)
        if not any(k[0] == fn for k in self.answers):
            raise AttributeError(fn)  # a binding this dump never called: as if pynvml lacked it

        def call(*args: Any) -> Any:
            key = (fn, json.dumps([_key(a) for a in args]))
            self.asked.append(f"{fn}{key[1]}")
            if key not in self.answers:
                raise NotRecorded(f"{fn}({', '.join(key[1][1:-1].split(', '))}) was not recorded on the GPU")
            answer = self.answers[key]
            if "error" in answer:
                raise NVMLError(answer["error"]["value"], answer["error"]["text"])
            if fn == "nvmlDeviceGetHandleByIndex":
                return Handle(args[0])
            return _value(answer["ok"])

        return call


def with_answer(dump: dict[str, Any], fn: str, args: list[Any], ok: Any = None, error: int | None = None) -> dict[str, Any]:
    """A copy of ``dump`` in which one recorded call answers differently (a host unlike the profile)."""
    out = copy.deepcopy(dump)
    for call in out["calls"]:
        if call["fn"] == fn and call["args"] == args:
            call.pop("ok", None)
            call.pop("error", None)
            if error is not None:
                call["error"] = {"class": "NVMLError", "value": error, "text": f"NVML error {error}"}
            else:
                call["ok"] = ok
            return out
    raise KeyError(f"{fn}{args} is not in the dump")
