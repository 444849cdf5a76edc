"""The test suite leaves the README's lab as it found it: its hosts are not the scenarios' hosts.

``start`` records whether the lab's hosts run (and boots them when they do not, so that the check
means something on a fresh machine); ``check``, after the scenarios, fails unless every host still
runs with ssh reachable and the same process (a scenario that stopped and restarted it would show a
new pid), then stops the hosts again if ``start`` booted them.

    python tests/lab_guard.py start -i inventory/lab/hosts.yml
    ... molecule, the lab fleet ...
    python tests/lab_guard.py check -i inventory/lab/hosts.yml
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

from llmfleet_lab.config import LabPaths  # noqa: E402


def status(inventory: str) -> dict[str, dict[str, object]]:
    done = subprocess.run([sys.executable, str(REPO / "tools" / "lab.py"), "status", "--json", "-i", inventory],
                          capture_output=True, text=True, check=True)
    return {h["name"]: h for h in json.loads(done.stdout)["hosts"]}


def lab(*args: str) -> None:
    subprocess.run([sys.executable, str(REPO / "tools" / "lab.py"), *args], check=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=["start", "check"])
    p.add_argument("-i", "--inventory", default="inventory/lab/hosts.yml")
    args = p.parse_args()
    record = LabPaths.default().lab / "run" / "lab-guard.json"
    if args.action == "start":
        before = status(args.inventory)
        booted = not all(h["running"] and h["ssh"] for h in before.values())
        if booted:
            lab("up", "-i", args.inventory)
        now = status(args.inventory)
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps({"booted": booted, "pids": {n: h["pid"] for n, h in now.items()}}))
        print(f"lab guard: {', '.join(sorted(now))} {'booted for the check' if booted else 'running'}; the suite must leave them so")
        return 0
    saved = json.loads(record.read_text())
    now = status(args.inventory)
    wrong = [f"{n} ({'stopped' if not h['running'] else 'no ssh' if not h['ssh'] else 'restarted'})"
             for n, h in sorted(now.items()) if not (h["running"] and h["ssh"] and h["pid"] == saved["pids"].get(n))]
    if saved["booted"]:
        lab("down", "-i", args.inventory)
    record.unlink()
    if wrong:
        print(f"lab guard: the suite touched the README's lab: {', '.join(wrong)}", file=sys.stderr)
        return 1
    print(f"lab guard: {', '.join(sorted(now))} still running, same processes, ssh ready" + ("; stopped again" if saved["booted"] else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
