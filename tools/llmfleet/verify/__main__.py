"""``python -m llmfleet.verify``."""

from llmfleet.verify.cli import main

raise SystemExit(main())
