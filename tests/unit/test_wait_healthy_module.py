"""The health wait (roles/vllm_service/library/llmfleet_wait_healthy.py) with faked probes and clock."""

from __future__ import annotations

from pathlib import Path

from by_path import load_file

REPO = Path(__file__).resolve().parents[2]
wh = load_file("llmfleet_wait_healthy", REPO / "roles" / "vllm_service" / "library" / "llmfleet_wait_healthy.py")

TINY = {"name": "tiny", "unit": "llmfleet-vllm@tiny.service", "url": "http://127.0.0.1:8000"}
TP2 = {"name": "tp2", "unit": "llmfleet-vllm@tp2.service", "url": "http://127.0.0.1:8001"}


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s


def test_waits_until_every_instance_answers_200() -> None:
    clock = Clock()
    ready_at = {TINY["url"]: 6.0, TP2["url"]: 10.0}
    report, failures = wh.wait(
        [TINY, TP2], 60, 2,
        health=lambda url: 200 if clock.now >= ready_at[url] else None,
        state=lambda unit: {"ActiveState": "activating", "NRestarts": "0"},
        clock=clock, sleep=clock.sleep,
    )
    assert failures == []
    assert {r["name"]: r["seconds"] for r in report} == {"tiny": 6.0, "tp2": 10.0}


def test_a_crashing_unit_fails_at_once_not_at_the_timeout() -> None:
    clock = Clock()
    _report, failures = wh.wait(
        [TINY, TP2], 600, 2,
        health=lambda url: 200 if url == TINY["url"] and clock.now >= 4 else None,
        state=lambda unit: {"ActiveState": "activating", "NRestarts": "1" if "tp2" in unit and clock.now >= 8 else "0"},
        clock=clock, sleep=clock.sleep,
    )
    assert [f["name"] for f in failures] == ["tp2"]
    assert "restarted it 1 time(s)" in failures[0]["why"]
    assert clock.now < 20


def test_a_failed_unit_is_named_with_its_result() -> None:
    clock = Clock()
    _, failures = wh.wait(
        [TINY], 600, 2, health=lambda url: None,
        state=lambda unit: {"ActiveState": "failed", "Result": "exit-code", "NRestarts": "0"},
        clock=clock, sleep=clock.sleep,
    )
    assert failures and "the unit failed (exit-code)" in failures[0]["why"]


def test_timeout_names_the_instance_and_its_state() -> None:
    clock = Clock()
    _, failures = wh.wait(
        [TINY], 10, 2, health=lambda url: 503,
        state=lambda unit: {"ActiveState": "active", "NRestarts": "0"},
        clock=clock, sleep=clock.sleep,
    )
    assert failures[0]["why"] == "no 200 from GET http://127.0.0.1:8000/health within 10 s (unit active)"
    assert clock.now == 10


def test_excerpt_puts_the_error_first_when_a_restart_buried_it() -> None:
    first = ["t launch[1]: usage: api_server.py [-h]"] * 40 + ["t launch[1]: api_server.py: error: unrecognized arguments: --no-such-flag"]
    second = ["t launch[2]: usage: api_server.py [-h]"] * 40
    text = wh.excerpt(first + second, 10)
    assert text.startswith("Lines that name an error:\nt launch[1]: api_server.py: error: unrecognized arguments: --no-such-flag")
    assert text.endswith("\n".join(second[-10:]))
