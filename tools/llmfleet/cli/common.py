"""What every llmfleet CLI shares: named exit codes and error handling without tracebacks."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from enum import IntEnum
from typing import Any

from ..errors import InputError, LlmfleetError, PlanRefused


class ExitCode(IntEnum):
    OK = 0  #: everything valid / every target met
    ERROR = 1  #: could not do the work (missing file, unreadable input, unreachable)
    REFUSED = 2  #: the input was read and refused (invalid spec, target missed)
    DRIFT = 3  #: the hosts were read and differ from their plan


def run(main: Callable[[], int], *, json_mode: Callable[[], bool] = lambda: False) -> int:
    """Call ``main``; turn llmfleet's errors into one clear message and a named exit code."""
    try:
        return main()
    except PlanRefused as exc:
        if json_mode():
            print(json.dumps({"ok": False, "problems": [p.to_dict() for p in exc.problems]}, indent=2, default=str))
        else:
            for p in exc.problems:
                print(f"refused: {p}", file=sys.stderr)
        return ExitCode.REFUSED
    except (InputError, LlmfleetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.ERROR
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return ExitCode.ERROR


def dump_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True, default=str))
