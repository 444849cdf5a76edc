#!/usr/bin/env python3
"""Compare live hosts with their current generation and the plan: ``tools/drift.py -i inventory/lab``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from llmfleet.cli.drift import main

if __name__ == "__main__":
    sys.exit(main())
