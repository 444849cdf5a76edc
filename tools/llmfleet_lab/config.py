"""What the lab is: its folder (LabPaths), its hosts and their addresses (Host, the inventory's group `lab`) and which
inventory booted which host. The address contract is docs/architecture.md's "Lab network"."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .system import LabError, one_line, write_file

#: every lab address; each /24 of it is one segment (a site's LAN) with a bridge of its own,
#: llmf<N> for 10.213.<N>.0/24, whose .1 is the control node. Traffic between the control node and a
#: segment crosses that bridge only: the segment's "WAN" link, whose bytes iptables can count.
LAB_RANGE = ipaddress.IPv4Network("10.213.0.0/16")
NETWORK = ipaddress.IPv4Network("10.213.0.0/24")  # the default segment (inventory/lab)
GATEWAY = ipaddress.IPv4Address("10.213.0.1")
BRIDGE = "llmf0"
BRIDGE_PREFIX = "llmf"
NETNS_PREFIX = "llmf-"
VETH_PREFIX = "lfv-"
HOST_NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,10}$")  # netns/veth names: 15 characters at most


@dataclass(frozen=True)
class Host:
    name: str
    ip: ipaddress.IPv4Address

    @property
    def segment(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(f"{self.ip}/24", strict=False)

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        return segment_gateway(self.segment)

    @property
    def bridge(self) -> str:
        return segment_bridge(self.segment)

    @property
    def netns(self) -> str:
        return NETNS_PREFIX + self.name

    @property
    def veth(self) -> str:
        return VETH_PREFIX + self.name


def segment_bridge(segment: ipaddress.IPv4Network) -> str:
    return f"{BRIDGE_PREFIX}{segment.network_address.packed[2]}"


def segment_gateway(segment: ipaddress.IPv4Network) -> ipaddress.IPv4Address:
    return segment.network_address + 1


def parse_inventory(data: Any, source: str) -> list[Host]:
    """Hosts of the group `lab` (under `all.children.lab.hosts` or `lab.hosts`), validated."""
    raw = _lab_group_hosts(data, source)
    hosts = [_parse_host(name, hvars, source) for name, hvars in raw.items()]
    if not hosts:
        raise LabError(f"{source}: group 'lab' has no hosts")
    _refuse_duplicate_ips(hosts, source)
    return hosts


def _lab_group_hosts(data: Any, source: str) -> Mapping[str, Any]:
    candidates = [_get(data, "all", "children", "lab"), _get(data, "lab")]
    for group in candidates:
        hosts = _get(group, "hosts")
        if isinstance(hosts, Mapping):
            return hosts
    raise LabError(f"{source}: no group 'lab' with hosts (expected all.children.lab.hosts or lab.hosts)")


def _get(data: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(data, Mapping):
            return None
        data = data.get(key)
    return data


def _parse_host(name: Any, hvars: Any, source: str) -> Host:
    if not isinstance(name, str) or not HOST_NAME_RE.match(name):
        raise LabError(f"{source}: host {name!r}: name must match {HOST_NAME_RE.pattern} (it names a network namespace and a veth)")
    address = hvars.get("ansible_host") if isinstance(hvars, Mapping) else None
    if address is None:
        raise LabError(f"{source}: host {name}: ansible_host is missing (its IP in {LAB_RANGE}, e.g. 10.213.0.11)")
    try:
        ip = ipaddress.IPv4Address(str(address))
    except ValueError:
        raise LabError(f"{source}: host {name}: ansible_host {address!r} is not an IPv4 address") from None
    host = Host(name, ip)
    reserved = {host.segment.network_address, host.segment.broadcast_address, host.gateway}
    if ip not in LAB_RANGE or ip in reserved:
        raise LabError(
            f"{source}: host {name}: ansible_host {ip} must be in {LAB_RANGE}, other than a segment's .1 "
            f"(the control node on bridge {BRIDGE_PREFIX}<N>) and its network/broadcast addresses"
        )
    return host


def _refuse_duplicate_ips(hosts: Sequence[Host], source: str) -> None:
    seen: dict[ipaddress.IPv4Address, str] = {}
    for host in hosts:
        if host.ip in seen:
            raise LabError(f"{source}: hosts {seen[host.ip]} and {host.name} share ansible_host {host.ip}")
        seen[host.ip] = host.name


def load_inventory(path: Path) -> list[Host]:
    """Lab hosts of a YAML inventory file, or of `<dir>/hosts.yml` for an inventory directory."""
    if path.is_dir():
        path = path / "hosts.yml"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LabError(f"inventory {path} not found: pass -i PATH to a YAML inventory with a group 'lab'") from None
    except OSError as exc:
        raise LabError(f"inventory {path}: cannot read it ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise LabError(f"inventory {path}: not valid YAML ({one_line(str(exc))})") from None
    return parse_inventory(data, str(path))


@dataclass(frozen=True)
class LabPaths:
    repo: Path
    cache: Path

    @classmethod
    def default(cls) -> LabPaths:
        cache = os.environ.get("LLMFLEET_CACHE") or str(Path.home() / ".cache" / "llmfleet")
        return cls(repo=Path(__file__).resolve().parents[2], cache=Path(cache).absolute())

    @property
    def lab(self) -> Path:
        """``$LLMFLEET_LAB_DIR`` (what the inventories and the Makefile read), else ``<repo>/.lab``: one
        folder for the hosts, their keys and their state, whichever checkout runs the command."""
        chosen = os.environ.get("LLMFLEET_LAB_DIR")
        return Path(chosen).absolute() if chosen else self.repo / ".lab"

    @property
    def machines(self) -> Path:
        return self.lab / "machines"

    @property
    def logs(self) -> Path:
        return self.lab / "logs"

    @property
    def run(self) -> Path:
        return self.lab / "run"

    @property
    def key(self) -> Path:
        return self.lab / "ssh" / "id_ed25519"

    @property
    def ssh_config(self) -> Path:
        return self.lab / "ssh_config"

    @property
    def wheelhouse(self) -> Path:
        return self.cache / "wheelhouse"

    def machine(self, host: str) -> Path:
        return self.machines / host

    def log(self, host: str) -> Path:
        return self.logs / f"{host}.log"

    def pidfile(self, host: str) -> Path:
        return self.run / f"{host}.pid"


def known_host_names(inventory: Path, paths: LabPaths) -> list[str]:
    """Hosts of the inventory plus those this inventory booted earlier (it may have changed since).

    Hosts booted from another inventory (the lab fleet beside the two-host lab, a molecule scenario)
    are left alone: several inventories share one lab.
    """
    names = [host.name for host in load_inventory(inventory)] if inventory.exists() else []
    if paths.run.is_dir():
        owner = str(inventory.absolute())
        for pidfile in sorted(paths.run.glob("*.pid")):
            record = _read_record(paths, pidfile.stem)
            if pidfile.stem not in names and record.get("inventory", owner) == owner:
                names.append(pidfile.stem)
    return names


def record_host(paths: LabPaths, host: Host, inventory: Path) -> None:
    """Remember which inventory booted a host and its address (ssh_config covers every booted host)."""
    doc = {"inventory": str(inventory.absolute()), "ip": str(host.ip)}
    write_file(paths.run, f"{host.name}.json", json.dumps(doc, sort_keys=True) + "\n")


def _read_record(paths: LabPaths, name: str) -> dict[str, Any]:
    try:
        doc = json.loads((paths.run / f"{name}.json").read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def recorded_hosts(paths: LabPaths) -> list[Host]:
    hosts = []
    for record in sorted(paths.run.glob("*.json")) if paths.run.is_dir() else []:
        with contextlib.suppress(KeyError, ValueError):
            hosts.append(Host(record.stem, ipaddress.IPv4Address(_read_record(paths, record.stem)["ip"])))
    return hosts
