# The roles' check of the plan (or the part of it) they are given, by the plan's one schema
# (llmfleet.plan_schema, on the control node): the list of problems, each naming the field, the value and
# what would be valid; empty when the value is valid. The roles assert it is empty.
#
#   "{{ vllm_service_plan | llmfleet_plan_problems }}"          the whole plan
#   "{{ vllm_runtime_plan | llmfleet_plan_problems('runtime') }}"  plan.runtime (also: models, driver)
#
# A deploy needs every pin resolved; deployable=false checks the shape only.
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

_TOOLS = Path(__file__).resolve().parents[2] / "tools"
if str(_TOOLS) not in sys.path:
    sys.path.insert(0, str(_TOOLS))

from llmfleet.inventory import plain  # noqa: E402
from llmfleet.plan_schema import problems  # noqa: E402


def llmfleet_plan_problems(value: Any, part: str = "plan", deployable: bool = True) -> list[str]:
    return problems(plain(value), part, deployable=bool(deployable))


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {"llmfleet_plan_problems": llmfleet_plan_problems}
