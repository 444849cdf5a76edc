#!/usr/bin/env python3
"""Pin runtimes and models, fetch them into the cache: ``tools/pin.py fetch``, ``tools/pin.py check``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from llmfleet.cli.pin import main

if __name__ == "__main__":
    sys.exit(main())
