"""What every llmfleet CLI shares: named exit codes, the host options, progress, errors without tracebacks.

One vocabulary across tools/plan.py, drift.py, pin.py and verify.py (docs/cli.md): ``-i/--inventory``
an inventory, ``-l/--limit`` an Ansible host pattern (as ``ansible-playbook -l``), ``--lock`` the pins
lock, ``--json`` a versioned envelope on stdout; exit 0 ok, 1 could not do the work, 2 refused or a
target missed, 3 drift. Work that takes more than a few seconds says so on stderr (``step``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from enum import IntEnum
from typing import Any, TextIO

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
    except BrokenPipeError:  # the reader of our output left (`plan.py --json | head`): nothing to say
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return ExitCode.ERROR


def dump_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True, default=str))


LIMIT_HELP = "only these hosts: an Ansible host pattern, as ansible-playbook -l (lab1, 'fl*', 'all:!fl4')"


def add_limit(p: argparse.ArgumentParser | Any, *, deprecated: tuple[str, ...] = ()) -> None:
    """``-l/--limit PATTERN``; older spellings still work, with a note (``deprecated_limit`` reads them)."""
    p.add_argument("-l", "--limit", metavar="PATTERN", help=LIMIT_HELP)
    for flag in deprecated:
        p.add_argument(flag, dest=f"_old_limit_{flag.lstrip('-')}", metavar="PATTERN", help=argparse.SUPPRESS)


def deprecated_limit(args: argparse.Namespace, prog: str, stream: TextIO | None = None) -> str | None:
    """The host pattern of ``-l/--limit``, or of an older spelling (with a deprecation note on stderr)."""
    limit: str | None = args.limit
    for name, value in sorted(vars(args).items()):
        if name.startswith("_old_limit_") and value is not None:
            flag = "--" + name[len("_old_limit_") :]
            print(f"note: {prog} {flag} is deprecated: use -l/--limit (the same host pattern)", file=stream or sys.stderr)
            if limit is not None and limit != value:
                raise InputError(f"{flag} {value} and -l/--limit {limit} disagree: give -l/--limit only")
            limit = value
    return limit


@contextlib.contextmanager
def step(what: str, stream: TextIO | None = None) -> Iterator[None]:
    """Say on stderr that ``what`` is under way and, when it ends, how long it took.

    Plain lines (a CI log shows them as they come); on a terminal the first one is a spinner.
    """
    out = stream or sys.stderr
    started = time.monotonic()
    status: Any = contextlib.nullcontext()
    if out.isatty():
        from rich.console import Console

        status = Console(file=out, highlight=False).status(f"{what}…")
    else:
        print(f"{what}…", file=out, flush=True)
    failed = True
    try:
        with status:
            yield
        failed = False
    finally:
        print(f"{what}: {'failed after' if failed else 'done in'} {time.monotonic() - started:.1f} s", file=out, flush=True)
