#!/usr/bin/python
"""llmfleet_generation_info: read the generations of an llmfleet host; changes nothing."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: llmfleet_generation_info
short_description: Read an llmfleet host's generations, its history and where a rollback would go
description:
  - Reports the generation C(<root>/current) points at, the default rollback target (C(previous)), the
    numbered history of switches and every generation on disk with its verdicts; with I(to), resolves a
    rollback target. Changes nothing (safe in check mode, never C(changed)).
  - The layout it reads is written in one place, C(module_utils/llmfleet_store.py); M(llmfleet_generation)
    changes it.
  - Runs on the managed host. Python standard library only.
version_added: "0.3.0"
author: llmfleet
options:
  root:
    description: The llmfleet root on the host (the plan's C(root)).
    type: path
    default: /var/lib/llmfleet
  to:
    description:
      - Rollback target to resolve, C(previous) (the newest switched-to generation other than the current one
        that is complete and not marked failed), a history number N, or a generation id (or a unique prefix of
        at least 8 characters). Fails, naming the valid ones, when it names none.
    type: str
"""

EXAMPLES = r"""
- name: Where would a rollback go
  llmfleet_generation_info:
    root: /var/lib/llmfleet
    to: previous
  register: generations
"""

RETURN = r"""
current:
  description: Generation id C(current) points at (null when none).
  returned: always
  type: str
previous:
  description: The default rollback target (null when there is none).
  returned: always
  type: str
target:
  description: The resolved rollback target.
  returned: when to is given
  type: str
history:
  description: Every switch, oldest first, C({n, generation, time, reason, from}).
  returned: always
  type: list
generations:
  description: Generations on disk, C({id, complete, verified, failed, numbers}).
  returned: always
  type: list
"""

import os  # noqa: E402
import sys  # noqa: E402
from typing import Any  # noqa: E402

from ansible.module_utils.basic import AnsibleModule  # noqa: E402

try:  # the host-state layout has one owner: module_utils/llmfleet_store.py
    from ansible.module_utils.llmfleet_store import GenerationRoot, exit_module
except ImportError:  # imported by the unit tests beside a checkout: module_utils/ is a sibling of library/
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "module_utils"))
    from llmfleet_store import GenerationRoot, exit_module  # type: ignore[no-redef]


def run(params: dict[str, Any]) -> dict[str, Any]:
    root = GenerationRoot(params["root"])
    result: dict[str, Any] = {"changed": False, **root.describe()}
    if params.get("to") is not None:
        result["target"] = root.resolve(str(params["to"]))
    return result


def main() -> None:
    module = AnsibleModule(
        argument_spec={"root": {"type": "path", "default": "/var/lib/llmfleet"}, "to": {"type": "str"}},
        supports_check_mode=True,
    )
    exit_module(module, lambda: run(dict(module.params)), module.params["root"])


if __name__ == "__main__":
    main()
