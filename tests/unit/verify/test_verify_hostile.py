"""verify against a hostile endpoint: every wait has a deadline and memory stays bounded.

A server that trickles a byte just inside the idle timeout, one that streams events forever and
one that answers every request with a 64 MiB error body are each run against the real CLI in a
subprocess; the run must end within its deadline (the test gives it a wall-clock limit well above
the deadline and fails if it has to kill it) and the verify process's peak RSS (its own VmHWM,
printed) must stay far below what the hostile server tried to make it hold.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from fake_vllm import Behaviour, serve

TOOLS = Path(__file__).resolve().parents[3] / "tools"
#: verify's own peak RSS (VmHWM of its own memory: ru_maxrss would keep the pytest parent's across
#: the spawn's exec), printed by the child as it exits
CHILD = (
    "import re, sys\n"
    f"sys.path.insert(0, {str(TOOLS)!r})\n"
    "from llmfleet.verify.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "hwm = re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1)\n"
    "print(f'peak-rss-kib {hwm}', file=sys.stderr)\n"
    "sys.exit(code)\n"
)
#: peak RSS of a verify run against a hostile server; a run against a good one is about 40-60 MiB
MAX_RSS_MIB = 200


@dataclass
class Ran:
    code: int
    text: str
    seconds: float
    peak_rss_mib: float


def run_verify(case: str, url: str, *args: str, limit_s: float) -> Ran:
    t0 = time.monotonic()
    try:
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, "--no-progress", "--url", url, *args],
            capture_output=True, text=True, timeout=limit_s, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail(f"{case}: verify did not end within {limit_s:g} s (killed)")
    seconds = time.monotonic() - t0
    lines = proc.stderr.strip().splitlines()
    rss = float(lines[-1].split()[1]) / 1024 if lines and lines[-1].startswith("peak-rss-kib ") else float("nan")
    ran = Ran(proc.returncode, proc.stdout + proc.stderr, seconds, rss)
    return ran


def report(case: str, ran: Ran, capsys: pytest.CaptureFixture[str]) -> None:
    with capsys.disabled():
        print(f"\nhostile endpoint, {case}: verify ended after {ran.seconds:.1f} s (exit {ran.code}), peak RSS {ran.peak_rss_mib:.0f} MiB")


def test_health_wait_keeps_its_deadline_when_a_body_trickles(capsys: pytest.CaptureFixture[str]) -> None:
    with serve(Behaviour(health="trickle")) as (url, _):
        ran = run_verify("trickling /health", url, "--ready-timeout", "2", "--idle-timeout", "1", limit_s=20)
    report("trickling /health (--ready-timeout 2)", ran, capsys)
    assert ran.code == 1 and "server not ready after 2 s" in ran.text, ran.text
    assert ran.peak_rss_mib < MAX_RSS_MIB


def test_every_request_has_a_total_deadline_by_default(capsys: pytest.CaptureFixture[str]) -> None:
    """No --request-timeout: a byte just inside the idle timeout still ends at first-byte + 5 × idle."""
    with serve(Behaviour(completions="trickle")) as (url, _):
        ran = run_verify("trickling stream", url, "--no-ladder", "--requests", "4", "--concurrency", "4",
                         "--first-byte-timeout", "1", "--idle-timeout", "1", limit_s=40)  # fmt: skip
    report("a byte every 0.2 s (--idle-timeout 1, default total 6 s)", ran, capsys)
    assert ran.code == 1 and "not complete within 6 s" in ran.text, ran.text
    assert ran.peak_rss_mib < MAX_RSS_MIB


def test_an_endless_stream_ends_the_request_not_the_memory(capsys: pytest.CaptureFixture[str]) -> None:
    with serve(Behaviour(completions="endless")) as (url, _):
        ran = run_verify("endless events", url, "--no-ladder", "--requests", "8", "--concurrency", "8", "--output-tokens", "32",
                         "--request-timeout", "25", limit_s=60)  # fmt: skip
    report("endless events, 8 streams (--request-timeout 25)", ran, capsys)
    assert ran.code == 1 and "more events than" in ran.text, ran.text
    assert ran.seconds < 15, "a stream past its max_tokens must end at once, not at the request deadline"
    assert ran.peak_rss_mib < MAX_RSS_MIB


def test_error_bodies_are_not_buffered_whole(capsys: pytest.CaptureFixture[str]) -> None:
    with serve(Behaviour(completions="huge_error")) as (url, _):
        ran = run_verify("64 MiB error bodies", url, "--no-ladder", "--requests", "16", "--concurrency", "16", limit_s=60)
    report("HTTP 500 with a 64 MiB body, 16 at once", ran, capsys)
    assert ran.code == 1 and "HTTP 500" in ran.text and "engine failed" in ran.text, ran.text
    assert ran.peak_rss_mib < MAX_RSS_MIB
