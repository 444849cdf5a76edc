#!/usr/bin/env python3
"""Print the plan llmfleet derives from an inventory: ``tools/plan.py -i inventory/lab``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from llmfleet.cli.plan import main

if __name__ == "__main__":
    sys.exit(main())
