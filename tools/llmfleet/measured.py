"""What is measured on a host, recorded into the inventory: the plan stays a pure value.

The planner reads only the inventory and the pins. A fact only the host can tell (today: the NVML
topology of its GPUs, which decides whether a tensor parallel pair crosses a socket) is measured by
``tools/plan.py -i INVENTORY -l HOSTS --record-gpus`` and written into the inventory directory as
one more inventory source, ``llmfleet-measured.yml``::

    all:
      hosts:
        edge-a01:
          llmfleet_measured_topology: [[X, NODE, SYS, SYS], ...]

Ansible and the planner read it as any host variable, so the control node, ``tools/drift.py`` and
the host's own GPU check plan the same generation; the GPU check only compares, and refuses a host
whose measured topology is not the recorded one. The file is meant to be committed with the
inventory (a reviewed change, like any other).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from .errors import InputError, PlanRefused
from .gpu_preflight import topology_from_facts
from .inventory import load_inventory_limited
from .plan import parse_spec, resolve_hardware

ENVELOPE = "llmfleet.measured/1"
MEASURED_FILE = "llmfleet-measured.yml"
VAR = "llmfleet_measured_topology"
MODULE = "nvidia_gpu_facts"
HEADER = (
    "# Written by tools/plan.py --record-gpus: what each host's NVML reported (nvidia_gpu_facts), an\n"
    "# inventory source of its own. The planner uses it in place of the hardware profile's topology;\n"
    "# record again after a hardware change (a host whose GPUs no longer match is refused).\n"
)

Runner = Callable[[Callable[[str], list[str]]], tuple[dict[str, Any], str]]


def record_gpus(inventory: str, limit: str | None, *, runner: Runner | None = None) -> dict[str, Any]:
    """Measure the GPU hosts of the limit and record their topology; the envelope of what happened."""
    from .drift import module_command, output_tail, run_module

    folder = Path(inventory)
    if not folder.is_dir():
        raise InputError(f"--record-gpus writes {MEASURED_FILE} into the inventory directory: {inventory} is not one "
                         "(give the directory, e.g. inventory/xr7620)")  # fmt: skip
    everyone, selected = load_inventory_limited(inventory, limit)
    counts: dict[str, int] = {}
    for host in map(str, selected):
        try:
            _, profile = resolve_hardware(host, parse_spec(host, everyone[host]))
        except PlanRefused as exc:
            raise InputError(f"{host}: its spec is refused, fix it first: {exc.problems[0]}") from None
        if profile.accelerator == "cuda":
            counts[host] = profile.device_count
    if not counts:
        raise InputError(f"no host of {limit or 'the inventory'} has a GPU profile: nothing to measure")
    pattern = ",".join(sorted(counts))
    results, output = (runner or run_module)(lambda tree: module_command(inventory, pattern, tree, MODULE, "require=false"))
    recorded: dict[str, list[list[str]]] = {}
    errors: dict[str, str] = {}
    for host in sorted(counts):
        doc = results.get(host)
        facts = ((doc or {}).get("ansible_facts") or {}).get("nvidia_gpu") if isinstance(doc, dict) else None
        if not isinstance(doc, dict):
            errors[host] = "ansible gave no result for this host" + (f" ({output_tail(output, 2)})" if output.strip() else "")
        elif doc.get("unreachable") or doc.get("failed"):
            errors[host] = ("unreachable: " if doc.get("unreachable") else f"{MODULE} failed: ") + " ".join(str(doc.get("msg")).split())
        elif not isinstance(facts, dict) or not facts.get("nvml_available"):
            errors[host] = f"NVML is not usable: {(facts or {}).get('error') or 'no nvidia_gpu facts'} (install the driver first)"
        else:
            topology = topology_from_facts(facts)
            if len(topology) != counts[host]:
                errors[host] = f"NVML shows {len(topology)} GPU(s), the hardware profile has {counts[host]}: fix the profile or the host"
            else:
                recorded[host] = topology
    path = folder / MEASURED_FILE
    if recorded:
        write_measured(path, recorded)
    return {"schema": ENVELOPE, "file": str(path), "recorded": recorded, "errors": errors, "ok": not errors}


def write_measured(path: Path, topologies: dict[str, list[list[str]]]) -> None:
    """Put each host's topology into the file (other hosts' entries stay), atomically."""
    doc: dict[str, Any] = {}
    if path.exists():
        try:
            doc = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise InputError(f"{path} is not YAML ({exc}): move it away and record again") from None
    top = doc.setdefault("all", {}) if isinstance(doc, dict) else None
    if isinstance(top, dict) and top.get("hosts") is None:
        top["hosts"] = {}
    hosts = top.get("hosts") if isinstance(top, dict) else None
    if not isinstance(hosts, dict):
        raise InputError(f"{path} is not an inventory of the form all: hosts: <host>: {VAR}: ...; move it away and record again")
    for host, topology in sorted(topologies.items()):
        name = str(host)  # plain str: Ansible's host names are tagged strings YAML cannot write
        entry = hosts.get(name) or {}
        entry[VAR] = [[str(level) for level in row] for row in topology]
        hosts[name] = entry
    text = HEADER + yaml.safe_dump(doc, default_flow_style=None, sort_keys=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise

