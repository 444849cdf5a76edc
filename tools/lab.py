#!/usr/bin/env python3
"""Thin shim over llmfleet_lab.cli: `tools/lab.py up|down|status|destroy` (run it with .venv/bin/python)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

try:
    from llmfleet_lab.cli import main
except ModuleNotFoundError as exc:
    if exc.name not in ("yaml", "rich"):
        raise
    print(f"error: Python package {exc.name!r} is missing: run tools/lab.py with <repo>/.venv/bin/python", file=sys.stderr)
    sys.exit(1)

if __name__ == "__main__":
    sys.exit(main())
