"""The plan's typed schema holds every plan the evaluator makes, and the published JSON Schema is current."""

from __future__ import annotations

from pathlib import Path

import pytest
from llmfleet.inventory import load_inventory
from llmfleet.pins import load_lock
from llmfleet.plan import evaluate_fleet
from llmfleet.plan_schema import Plan, json_schema_text
from pydantic import ValidationError

REPO = Path(__file__).resolve().parents[2]
INVENTORIES = ["inventory/lab", "inventory/lab-fleet", "inventory/xr7620", "tests/molecule/lab/inventory"]


#: the fixture lock names no wheel files: a site's hosts (lab-fleet) are refused with it
CASES = [(inv, "pins/lock.json") for inv in INVENTORIES] + [(inv, "tests/fixtures/lock.json") for inv in INVENTORIES if "fleet" not in inv]


@pytest.mark.parametrize(("inventory", "lock"), CASES)
def test_every_plan_of_every_inventory_fits_the_schema(inventory: str, lock: str) -> None:
    plans, _ = evaluate_fleet(load_inventory(REPO / inventory), load_lock(REPO / lock))
    assert plans, f"{inventory} planned no host"
    for host, plan in plans.items():
        typed = Plan.model_validate(plan)
        assert typed.generation == plan["generation"], host


def test_a_plan_with_a_field_nobody_declared_is_refused() -> None:
    plans, _ = evaluate_fleet(load_inventory(REPO / "inventory" / "lab"), load_lock(REPO / "pins" / "lock.json"))
    plan = plans["lab1"]
    with pytest.raises(ValidationError, match=r"instances\.0\.unexpected"):
        Plan.model_validate({**plan, "instances": [{**plan["instances"][0], "unexpected": 1}]})
    with pytest.raises(ValidationError, match=r"service\.unit_revision"):
        Plan.model_validate({**plan, "service": {**plan["service"], "unit_revision": 3}})


def test_the_published_json_schema_is_the_model_s() -> None:
    published = REPO / "docs" / "plan.schema.json"
    assert published.read_text() == json_schema_text(), "docs/plan.schema.json is stale: tools/plan.py --schema > docs/plan.schema.json"
