from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
TOOLS = REPO / "tools"
for p in (str(HERE), str(TOOLS)):
    if p not in sys.path:
        sys.path.insert(0, p)

from llmfleet.verify import cli  # noqa: E402


@dataclass
class CliRun:
    code: int
    out: str
    err: str
    seconds: float


RunCli = Callable[..., CliRun]


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str]) -> RunCli:
    """Run ``cli.main(argv)`` in-process; return exit code, stdout, stderr and wall time."""

    def run(*argv: str) -> CliRun:
        t0 = time.monotonic()
        code = cli.main(["--no-progress", *argv])
        seconds = time.monotonic() - t0
        captured = capsys.readouterr()
        return CliRun(code, captured.out, captured.err, seconds)

    return run
