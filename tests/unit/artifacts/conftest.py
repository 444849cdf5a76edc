"""Fixtures for pinning and fetching: the test hub on loopback, a clean cache and hub home."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[2]
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from testhub import TestHub  # noqa: E402


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestHub]:
    """A started test hub; HF_ENDPOINT points at it, HF_HOME is empty, no token is set."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "LLMFLEET_LOCK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    with TestHub(tokens={"hf_good_token_for_tests": {"gated-org/gated-model"}, "hf_other_token": set()}) as h:
        monkeypatch.setenv("HF_ENDPOINT", h.endpoint)
        yield h


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("LLMFLEET_CACHE", str(root))
    monkeypatch.delenv("LLMFLEET_LOCK", raising=False)
    return root
