#!/usr/bin/env python3
"""Check a live vLLM endpoint against a plan's targets: ``tools/verify.py --plan FILE [--instance NAME]``.

Exit 0 all targets met, 2 a target missed or a regression, 1 could not measure. Stdlib only (rich optional).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from llmfleet.verify.cli import main

if __name__ == "__main__":
    sys.exit(main())
