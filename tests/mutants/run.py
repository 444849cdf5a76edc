#!/usr/bin/env python3
"""Apply each mutant of mutants.yml to a copy of the repository and run the test that must catch it.

    .venv/bin/python tests/mutants/run.py [--before] [ID ...]

Prints one line per mutant: caught (the test failed on the mutant) or SURVIVED, and with --before
what the test it replaced did on the same mutant. Exit 0 when every mutant is caught, 2 otherwise.
The product files are never changed: the copy is a temporary folder.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
COPY = ("tools", "library", "tests", "pins", "pyproject.toml")


def run_tests(root: Path, tests: str) -> int:
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests.split()]
    return subprocess.run(cmd, cwd=root, capture_output=True, text=True, check=False).returncode


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", action="store_true", help="also run the test each strengthened one replaced")
    p.add_argument("ids", nargs="*")
    args = p.parse_args()
    mutants = yaml.safe_load((Path(__file__).parent / "mutants.yml").read_text())["mutants"]
    if args.ids:
        mutants = [m for m in mutants if m["id"] in args.ids]
    survived = 0
    with tempfile.TemporaryDirectory(prefix="llmfleet-mutants-") as tmp:
        for m in mutants:
            root = Path(tmp) / m["id"]
            root.mkdir()
            for name in COPY:
                src = REPO / name
                (shutil.copytree if src.is_dir() else shutil.copy)(src, root / name)
            target = root / m["file"]
            text = target.read_text()
            if text.count(m["old"]) != 1:
                print(f"{m['id']}: the text to change is not in {m['file']} exactly once: fix mutants.yml")
                return 1
            if run_tests(root, m["test"]) != 0:
                print(f"{m['id']}: the tests fail before the mutation: fix them first")
                return 1
            target.write_text(text.replace(m["old"], m["new"]))
            caught = run_tests(root, m["test"]) != 0
            survived += not caught
            line = f"{m['id']:42} {'caught' if caught else 'SURVIVED':9} by {m['test']}"
            if args.before and m.get("before"):
                line += f"; before: {'caught' if run_tests(root, m['before']) != 0 else 'survived'} by {m['before']}"
            print(line, flush=True)
    return 2 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
