"""What the CLIs share (llmfleet.cli.common): the host option, progress on stderr."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))

from llmfleet.cli.common import step  # noqa: E402


def test_step_says_what_is_under_way_and_how_long_it_took() -> None:
    out = io.StringIO()
    with step("drift: checking 4 hosts", out):
        pass
    first, last = out.getvalue().splitlines()
    assert first == "drift: checking 4 hosts…"
    assert last.startswith("drift: checking 4 hosts: done in ") and last.endswith(" s")


def test_step_says_when_the_work_failed() -> None:
    out = io.StringIO()
    with pytest.raises(RuntimeError), step("fetch", out):
        raise RuntimeError("boom")
    assert out.getvalue().splitlines()[-1].startswith("fetch: failed after ")


def test_pin_fetch_limit_names_hosts_of_an_inventory() -> None:
    def pin(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(REPO / "tools" / "pin.py"), *args], capture_output=True, text=True, cwd=REPO, check=False
        )

    alone = pin("check", "-l", "lab1")
    assert alone.returncode == 1 and alone.stderr == "error: -l/--limit needs -i/--inventory (the hosts whose artifacts to take)\n"
    nohost = pin("check", "-i", "inventory/lab", "-l", "nohost")
    assert nohost.returncode == 1 and "-l/--limit nohost matches no host of inventory/lab" in nohost.stderr
