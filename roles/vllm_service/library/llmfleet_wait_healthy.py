#!/usr/bin/python
"""llmfleet_wait_healthy: wait until vLLM instances answer /health, fail fast when one crashes."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: llmfleet_wait_healthy
short_description: Wait until llmfleet's vLLM instances are healthy; fail fast and with the journal when one crashes
description:
  - Polls C(GET <url>/health) of every instance until each answers 200, within I(timeout) seconds.
  - Watches each instance's systemd unit meanwhile. A unit that systemd restarted on its own (C(NRestarts) above 0)
    or that entered the C(failed) state will not get healthy by waiting; the module fails at once with the last
    journal lines of that unit instead of waiting out the timeout (a vLLM that rejects its arguments exits in
    seconds and is restarted by C(Restart=always)).
  - Runs on the managed host. Python standard library only. Reads only; check mode returns without waiting.
version_added: "0.1.0"
author: llmfleet
options:
  instances:
    description: The instances, each C({name, unit, url}) as in the plan.
    type: list
    elements: dict
    required: true
  timeout:
    description: Seconds all instances together may take to become healthy.
    type: int
    default: 600
  delay:
    description: Seconds between two rounds of probes.
    type: float
    default: 2
  journal_lines:
    description: Journal lines of a failing unit returned in the failure message.
    type: int
    default: 60
"""

EXAMPLES = r"""
- name: Wait for the health endpoints
  llmfleet_wait_healthy:
    instances: [{name: tiny, unit: llmfleet-vllm@tiny.service, url: "http://127.0.0.1:8000"}]
    timeout: 600
"""

RETURN = r"""
instances:
  description: Per instance, C({name, healthy, seconds, state, restarts}).
  returned: always
  type: list
elapsed:
  description: Seconds waited.
  returned: always
  type: float
"""

import re  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import urllib.error  # noqa: E402
import urllib.request  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

from ansible.module_utils.basic import AnsibleModule  # noqa: E402


def probe_health(url: str, timeout: float = 5.0) -> int | None:
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (OSError, ValueError):
        return None


def unit_state(unit: str) -> dict[str, str]:
    out = subprocess.run(
        ["systemctl", "show", "--property=ActiveState,SubState,NRestarts,Result", "--", unit],
        capture_output=True, text=True, check=False,
    ).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


ERROR_LINE = re.compile(r"error|exception|traceback|refused|denied|not found|no such|killed|out of memory", re.IGNORECASE)


def journal(unit: str, lines: int, since: float) -> str:
    """The unit's lines that name an error (a crash loop buries them under the next start), then its tail."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since - 1))
    result = subprocess.run(
        ["journalctl", "--unit", unit, "--lines", "5000", "--no-pager", "--output", "short-iso", "--since", stamp],
        capture_output=True, text=True, check=False,
    )
    return excerpt((result.stdout or "").splitlines(), lines) or (result.stderr or "(journal not readable)").rstrip()


def excerpt(text: list[str], lines: int) -> str:
    errors: list[str] = []
    for line in text:
        if ERROR_LINE.search(line.split(": ", 1)[-1]) and line not in errors:
            errors.append(line)
    errors = errors[-15:]
    parts = []
    if errors:
        parts.append("Lines that name an error:\n" + "\n".join(errors))
    if text:
        parts.append(f"Last {min(lines, len(text))} lines:\n" + "\n".join(text[-lines:]))
    return "\n".join(parts)


def crashed(state: dict[str, str]) -> str | None:
    """Why waiting longer is pointless, or None."""
    if state.get("ActiveState") == "failed":
        return f"the unit failed ({state.get('Result', '?')})"
    try:
        restarts = int(state.get("NRestarts", "0") or 0)
    except ValueError:
        restarts = 0
    if restarts > 0:
        return f"systemd restarted it {restarts} time(s): it exited on its own"
    return None


def wait(
    instances: list[dict[str, Any]],
    timeout: float,
    delay: float,
    health: Callable[[str], int | None] = probe_health,
    state: Callable[[str], dict[str, str]] = unit_state,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(report per instance, failures): each failure {name, unit, url, why}."""
    start = clock()
    report = {i["name"]: {"name": i["name"], "healthy": False, "seconds": None, "state": None, "restarts": 0} for i in instances}
    pending = list(instances)
    failures: list[dict[str, Any]] = []
    while pending:
        for inst in list(pending):
            status = health(inst["url"])
            if status == 200:
                report[inst["name"]].update(healthy=True, seconds=round(clock() - start, 1))
                pending.remove(inst)
                continue
            st = state(inst["unit"])
            report[inst["name"]].update(state=st.get("ActiveState"), restarts=int(st.get("NRestarts", "0") or 0))
            why = crashed(st)
            if why:
                failures.append({**inst, "why": f"{why}; last answer to GET /health: {status or 'none'}"})
                pending.remove(inst)
        if not pending:
            break
        if clock() - start >= timeout:
            failures += [
                {**i, "why": f"no 200 from GET {i['url']}/health within {timeout:g} s (unit {report[i['name']]['state']})"}
                for i in pending
            ]
            break
        sleep(delay)
    return list(report.values()), failures


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "instances": {"type": "list", "elements": "dict", "required": True},
            "timeout": {"type": "int", "default": 600},
            "delay": {"type": "float", "default": 2},
            "journal_lines": {"type": "int", "default": 60},
        },
        supports_check_mode=True,
    )
    instances = module.params["instances"]
    for index, inst in enumerate(instances):
        missing = [k for k in ("name", "unit", "url") if not isinstance(inst.get(k), str) or not inst.get(k)]
        if missing:
            module.fail_json(msg=f"instances[{index}] lacks {', '.join(missing)}: expected {{name, unit, url}} as in the plan")
    if module.check_mode:
        module.exit_json(changed=False, instances=[], elapsed=0.0)
    began_wall, began = time.time(), time.monotonic()
    report, failures = wait(instances, float(module.params["timeout"]), float(module.params["delay"]))
    elapsed = round(time.monotonic() - began, 1)
    if failures:
        parts = []
        for f in failures:
            parts.append(
                f"instance {f['name']} ({f['unit']}) is not healthy: {f['why']}.\n"
                f"Its journal since the switch:\n"
                f"{journal(f['unit'], module.params['journal_lines'], began_wall)}"
            )
        module.fail_json(msg="\n".join(parts), instances=report, elapsed=elapsed)
    module.exit_json(changed=False, instances=report, elapsed=elapsed)


if __name__ == "__main__":
    main()
