"""An instance that requires an API key must refuse a request without it: verify asks once, without
the key, and fails the run when the server answers (an exposed instance that came back keyless)."""

from __future__ import annotations

import json

import pytest
from conftest import RunCli
from fake_vllm import Behaviour, serve

KEY = "k" * 24


def _check(out: str, name: str) -> dict[str, object]:
    env = json.loads(out)
    return next(c for c in env["checks"] if c["name"] == name)


def test_a_server_that_answers_without_the_key_fails_the_run(run_cli: RunCli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMFLEET_TEST_KEY", KEY)
    with serve(Behaviour(api_key=None)) as (url, _):
        r = run_cli("--url", url, "--api-key-env", "LLMFLEET_TEST_KEY", "--json", "--no-ladder", "--requests", "4")
    check = _check(r.out, "api_key_required")
    assert check["verdict"] == "fail" and "without the API key" in str(check["detail"]), check
    assert r.code == 2, r.out + r.err


def test_a_server_that_refuses_a_request_without_the_key_passes(run_cli: RunCli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMFLEET_TEST_KEY", KEY)
    with serve(Behaviour(api_key=KEY)) as (url, fake):
        r = run_cli("--url", url, "--api-key-env", "LLMFLEET_TEST_KEY", "--json", "--no-ladder", "--requests", "4")
    assert _check(r.out, "api_key_required")["verdict"] == "pass"
    assert r.code == 0, r.out + r.err
    assert None in fake.state.authorizations  # the one request sent without the key
