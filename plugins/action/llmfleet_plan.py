# The bridge from Ansible to the llmfleet evaluator, nothing more: it gathers the host's
# llmfleet_* variables, calls llmfleet.plan.evaluate_host on the control node and returns the
# plan as the fact `llmfleet_plan`. It never contacts the host.
# With `gpu_facts` (the host's measured `nvidia_gpu` facts), it checks them against the plan's hardware
# (llmfleet.gpu_preflight: per GPU, expected vs found; the NVML topology): it only compares, the plan
# stays what the inventory and the pins give (a measured topology is recorded into the inventory).
from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path

from ansible.plugins.action import ActionBase

_TOOLS = Path(__file__).resolve().parents[2] / "tools"
if str(_TOOLS) not in sys.path:
    sys.path.insert(0, str(_TOOLS))

from llmfleet.errors import LlmfleetError, PlanRefused  # noqa: E402
from llmfleet.gpu_preflight import check_plan_against_gpu_facts  # noqa: E402
from llmfleet.inventory import plain  # noqa: E402
from llmfleet.pins import load_lock  # noqa: E402
from llmfleet.plan import API_KEYS_VAR, evaluate_host  # noqa: E402
from llmfleet.spec import spec_vars  # noqa: E402


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _VALID_ARGS = frozenset(("lock", "strict", "gpu_facts"))
    _requires_connection = False

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        task_vars = task_vars or {}
        host = task_vars.get("inventory_hostname", "?")
        lock_path = self._task.args.get("lock")  # None: $LLMFLEET_LOCK or pins/lock.json
        strict = bool(self._task.args.get("strict", True))
        # evaluate_host sees the same llmfleet_* variables tools/plan.py reads from the inventory
        raw = {"llmfleet_" + k: plain(self._templar.template(v)) for k, v in spec_vars(task_vars).items()}
        # the API keys' instance names only: the keys never reach the evaluator or the plan
        keys = task_vars.get(API_KEYS_VAR)
        if keys is not None:
            raw[API_KEYS_VAR] = sorted(str(k) for k in keys) if isinstance(keys, Mapping) else type(keys).__name__
        gpu_facts = self._task.args.get("gpu_facts")
        try:
            lock = load_lock(lock_path)
            plan = evaluate_host(host, raw, lock)
            if gpu_facts is not None:
                plan = check_plan_against_gpu_facts(host, plan, plain(gpu_facts))
        except PlanRefused as exc:
            result.update(failed=True, msg="plan refused:\n" + "\n".join(str(p) for p in exc.problems),
                          problems=[p.to_dict() for p in exc.problems])
            return result
        except LlmfleetError as exc:
            result.update(failed=True, msg=str(exc))
            return result
        if strict and plan["unresolved"]:
            result.update(failed=True, plan_generation=plan["generation"],
                          msg=f"{host}: refusing to deploy unresolved pins: " + "; ".join(plan["unresolved"])
                          + " (pin them with tools/pin.py, or use an inventory whose pins are resolved)")
            return result
        result.update(changed=False, ansible_facts={"llmfleet_plan": plan}, warnings=plan["warnings"] or [])
        if not plan["warnings"]:
            result.pop("warnings")
        return result
