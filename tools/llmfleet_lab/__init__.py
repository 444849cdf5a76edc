"""The lab: a small fleet of systemd-nspawn hosts on the control node.

`up` builds (or reuses) a cached Debian rootfs tarball, unpacks one machine root per host of the
inventory group `lab`, wires each host into its own network namespace `llmf-<host>` with a veth on
the bridge of its segment (`llmf<N>` for 10.213.<N>.0/24, the control node at .1, NAT to the default
route; a site's hosts share a segment) and boots it with a real systemd. `down` stops the hosts and
removes exactly what `up` created; `status` reports; `destroy` is `down` plus removing the machine roots
of the inventory's hosts (the hosts of another inventory keep theirs).

Everything the lab creates is recognisable as its own: machine roots under `<lab>/machines` (`<lab>`
is `$LLMFLEET_LAB_DIR`, else `<repo>/.lab`), network namespaces `llmf-<host>`, veths `lfv-<host>`,
cgroups `llmfleet-lab/<host>`, bridges `llmf<N>` and iptables rules that carry the comment
`llmfleet-lab`. Teardown touches nothing else.

Modules: config (the lab folder, hosts, inventories), system (commands, files, locks), rootfs, network,
machines (nspawn processes, cgroups), ssh, cli (tools/lab.py). The llmfleet package never imports this one.
"""
