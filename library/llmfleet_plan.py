#!/usr/bin/python
# Documentation for the llmfleet_plan action (plugins/action/llmfleet_plan.py). The work is done
# on the control node by the action plugin; this module only fails if it is ever run on a host.
from __future__ import annotations

DOCUMENTATION = r"""
module: llmfleet_plan
short_description: Evaluate a host's llmfleet spec and pins into its plan
description:
  - Gathers the host's C(llmfleet_*) inventory variables and evaluates them with the pins lock
    into the host's plan, on the control node, without touching the host.
  - Sets the fact C(llmfleet_plan). Refuses an invalid spec with every problem named.
options:
  lock:
    description: Path of the pins lock file on the control node.
    type: path
    default: pins/lock.json next to the llmfleet package
  strict:
    description: Also refuse unresolved pins (what a deploy needs).
    type: bool
    default: true
author: llmfleet
"""

EXAMPLES = r"""
- name: Plan | Evaluate the host's spec
  llmfleet_plan:
    strict: true
"""

RETURN = r"""
ansible_facts:
  description: C(llmfleet_plan), the host's plan.
  returned: success
  type: dict
"""

from ansible.module_utils.basic import AnsibleModule  # noqa: E402


def main():
    module = AnsibleModule(argument_spec={"lock": {"type": "path"}, "strict": {"type": "bool", "default": True}})
    module.fail_json(msg="llmfleet_plan runs on the control node as an action plugin; check action_plugins in ansible.cfg")


if __name__ == "__main__":
    main()
