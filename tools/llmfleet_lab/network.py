"""The lab's network: a host's address and name files, a bridge per segment, a netns and veth per host, and the
NAT rules, each tagged `llmfleet-lab`."""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import json
import os
import re
import shlex
import shutil
import signal
from collections.abc import Sequence
from pathlib import Path

from .config import BRIDGE_PREFIX, LAB_RANGE, NETNS_PREFIX, NETWORK, VETH_PREFIX, Host, LabPaths, segment_bridge, segment_gateway
from .system import LabError, run

CONTAINER_IF = "host0"
RULE_COMMENT = "llmfleet-lab"
NETWORK_FILE = "etc/systemd/network/10-llmfleet-lab.network"


def render_network(ip: ipaddress.IPv4Address, nameservers: Sequence[str]) -> str:
    segment = ipaddress.IPv4Network(f"{ip}/24", strict=False)
    lines = [
        "# Written by llmfleet lab (tools/lab.py): static address on the lab bridge.",
        "[Match]",
        f"Name={CONTAINER_IF}",
        "",
        "[Network]",
        f"Address={ip}/{segment.prefixlen}",
        f"Gateway={segment_gateway(segment)}",
        *(f"DNS={ns}" for ns in nameservers),
        "LinkLocalAddressing=no",
        "IPv6AcceptRA=no",
    ]
    return "\n".join(lines) + "\n"


def render_hosts(hosts: Sequence[Host]) -> str:
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    lines += [f"{host.ip}\t{host.name}" for host in hosts]
    return "\n".join(lines) + "\n"


def render_resolv(nameservers: Sequence[str]) -> str:
    return "".join(f"nameserver {ns}\n" for ns in nameservers)


def parse_nameservers(text: str) -> list[str]:
    """IPv4/IPv6 nameservers of a resolv.conf, loopback ones left out (unusable inside a host)."""
    found: list[str] = []
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) < 2 or fields[0] != "nameserver":
            continue
        try:
            address = ipaddress.ip_address(fields[1])
        except ValueError:
            continue
        if not address.is_loopback and str(address) not in found:
            found.append(str(address))
    return found


def nat_rules(out_interface: str) -> list[tuple[str, list[str]]]:
    """(table, rule) pairs: masquerade the lab's addresses out of the uplink, let them be forwarded."""
    net = str(LAB_RANGE)
    tag = ["-m", "comment", "--comment", RULE_COMMENT]
    return [
        ("nat", ["POSTROUTING", "-s", net, "!", "-d", net, "-o", out_interface, *tag, "-j", "MASQUERADE"]),
        ("filter", ["FORWARD", "-s", net, *tag, "-j", "ACCEPT"]),
        ("filter", ["FORWARD", "-d", net, "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", *tag, "-j", "ACCEPT"]),
    ]  # fmt: skip


def owned_rule_deletions(listing: str) -> list[list[str]]:
    """`iptables -S CHAIN` output → the `-D` arguments of each rule tagged as the lab's."""
    deletions = []
    for line in listing.splitlines():
        args = shlex.split(line)
        if len(args) > 2 and args[0] == "-A" and _has_comment(args, RULE_COMMENT):
            deletions.append(["-D", *args[1:]])
    return deletions


def _has_comment(args: Sequence[str], comment: str) -> bool:
    return any(a == "--comment" and b == comment for a, b in itertools.pairwise(args))


def host_nameservers() -> list[str]:
    for source in (Path("/etc/resolv.conf"), Path("/run/systemd/resolve/resolv.conf")):
        with contextlib.suppress(OSError):
            found = parse_nameservers(source.read_text())
            if found:
                return found
    raise LabError("no usable nameserver in /etc/resolv.conf (loopback ones do not work inside a lab host)")


def link_exists(name: str, netns: str | None = None) -> bool:
    argv = ["ip", *(["-n", netns] if netns else []), "link", "show", "dev", name]
    return run(argv, check=False).returncode == 0


def _netns_exists(name: str) -> bool:
    return Path("/run/netns", name).exists()


def ensure_bridge(segment: ipaddress.IPv4Network = NETWORK) -> None:
    bridge = segment_bridge(segment)
    if not link_exists(bridge):
        run(["ip", "link", "add", bridge, "type", "bridge"])
    run(["ip", "addr", "replace", f"{segment_gateway(segment)}/{segment.prefixlen}", "dev", bridge])
    run(["ip", "link", "set", bridge, "up"])


def default_route_interface() -> str:
    routes = json.loads(run(["ip", "-j", "-4", "route", "show", "default"]).stdout or "[]")
    for route in routes:
        if route.get("dev"):
            return str(route["dev"])
    raise LabError("no IPv4 default route on this machine: the lab NATs its hosts out of it")


def ensure_nat(paths: LabPaths) -> None:
    forward = Path("/proc/sys/net/ipv4/ip_forward")
    if forward.read_text().strip() != "1":
        saved = paths.run / "ip_forward.orig"
        if not saved.exists():
            saved.write_text(forward.read_text())
        forward.write_text("1\n")
    for table, rule in nat_rules(default_route_interface()):
        if run(["iptables", "-w", "-t", table, "-C", *rule], check=False).returncode != 0:
            chain, spec = rule[0], rule[1:]
            verb = ["-A", chain] if table == "nat" else ["-I", chain, "1"]
            run(["iptables", "-w", "-t", table, *verb, *spec])


def remove_nat(paths: LabPaths) -> list[str]:
    removed = []
    if shutil.which("iptables"):
        for table, chain in (("nat", "POSTROUTING"), ("filter", "FORWARD")):
            listing = run(["iptables", "-w", "-t", table, "-S", chain], check=False).stdout
            for deletion in owned_rule_deletions(listing):
                run(["iptables", "-w", "-t", table, *deletion])
                removed.append(f"iptables {table} {chain} rule")
    saved = paths.run / "ip_forward.orig"
    if saved.exists():
        Path("/proc/sys/net/ipv4/ip_forward").write_text(saved.read_text())
        saved.unlink()
        removed.append("ip_forward setting (restored)")
    return removed


def ensure_host_link(host: Host) -> None:
    if not _netns_exists(host.netns):
        run(["ip", "netns", "add", host.netns])
    if link_exists(host.veth) and not link_exists(CONTAINER_IF, host.netns):
        run(["ip", "link", "del", host.veth])  # half a pair: start over
    if not link_exists(host.veth):
        run(["ip", "link", "add", host.veth, "type", "veth", "peer", "name", CONTAINER_IF, "netns", host.netns])
    run(["ip", "link", "set", host.veth, "master", host.bridge, "up"])


def remove_host_link(host_name: str) -> list[str]:
    removed = []
    veth, netns = VETH_PREFIX + host_name, NETNS_PREFIX + host_name
    if link_exists(veth):
        run(["ip", "link", "del", veth])
        removed.append(f"veth {veth}")
    if _netns_exists(netns):
        _kill_netns_leftovers(netns)
        run(["ip", "netns", "del", netns])
        removed.append(f"netns {netns}")
    return removed


def _kill_netns_leftovers(netns: str) -> None:
    """Processes still inside one of our namespaces after nspawn exited are the container's."""
    pids = run(["ip", "netns", "pids", netns], check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


def _bridge_ports(bridge: str) -> list[str]:
    links = json.loads(run(["ip", "-j", "link", "show", "master", bridge], check=False).stdout or "[]")
    return [str(link.get("ifname")) for link in links]


def lab_bridges() -> list[str]:
    """The lab's bridges on this machine (llmf<N>)."""
    links = json.loads(run(["ip", "-j", "link", "show", "type", "bridge"], check=False).stdout or "[]")
    names = [str(link.get("ifname")) for link in links]
    return sorted(n for n in names if re.fullmatch(BRIDGE_PREFIX + r"\d{1,3}", n))


def remove_network(paths: LabPaths) -> list[str]:
    """A bridge goes when its last host does; NAT with the last bridge (other inventories' hosts may
    still use them)."""
    removed = []
    for bridge in lab_bridges():
        if not _bridge_ports(bridge):
            run(["ip", "link", "del", bridge])
            removed.append(f"bridge {bridge}")
    if lab_bridges():
        return removed
    return removed + remove_nat(paths)
