"""Exit codes and the one error that ends a run with a one-line reason."""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """What ``python -m llmfleet.verify`` exits with (pipx ``ExitCode`` style)."""

    OK = 0  # measured, every target met
    ERROR = 1  # could not measure: server down, timeout, 5xx, broken stream, wrong model, bad input
    TARGET_MISSED = 2  # measured, at least one target missed (or a regression against the last good run)


class VerifyError(Exception):
    """The run cannot measure. ``str()`` is the one-line reason shown to the operator."""
