"""The pure parts of the lab tool: inventory, rootfs cache key, rendered files, refusals."""

from __future__ import annotations

import argparse
import io
import ipaddress
import os
import shutil
from pathlib import Path

import pytest
import yaml
from llmfleet_lab import cli, config, machines, network, rootfs, ssh, system
from llmfleet_lab.cli import ExitCode
from llmfleet_lab.config import Host
from llmfleet_lab.rootfs import RootfsSpec
from llmfleet_lab.system import LabError
from rich.console import Console

REPO = Path(__file__).resolve().parents[2]



@pytest.fixture(autouse=True)
def _no_shared_lab(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Makefile exports LLMFLEET_LAB_DIR: these tests keep their lab under their own tmp repo."""
    monkeypatch.delenv("LLMFLEET_LAB_DIR", raising=False)

def ip(text: str) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(text)


def lab_doc(hosts: dict[str, object]) -> dict[str, object]:
    return {"all": {"children": {"lab": {"hosts": hosts}}}}


# --- inventory ---------------------------------------------------------------------------------


def test_parse_inventory_reads_all_children_lab_in_order() -> None:
    doc = lab_doc({"lab2": {"ansible_host": "10.213.0.12"}, "lab1": {"ansible_host": "10.213.0.11", "x": 1}})
    assert config.parse_inventory(doc, "inv") == [Host("lab2", ip("10.213.0.12")), Host("lab1", ip("10.213.0.11"))]


def test_parse_inventory_reads_top_level_lab_group() -> None:
    doc = {"lab": {"hosts": {"lab1": {"ansible_host": "10.213.0.11"}}}}
    assert config.parse_inventory(doc, "inv") == [Host("lab1", ip("10.213.0.11"))]


def test_repo_lab_inventory_matches_the_network_contract() -> None:
    hosts = config.load_inventory(REPO / "inventory" / "lab")  # a directory means its hosts.yml
    assert [(h.name, str(h.ip)) for h in hosts] == [("lab1", "10.213.0.11"), ("lab2", "10.213.0.12")]
    assert [(h.netns, h.veth) for h in hosts] == [("llmf-lab1", "lfv-lab1"), ("llmf-lab2", "lfv-lab2")]


@pytest.mark.parametrize(
    ("doc", "fragment"),
    [
        ({"all": {"children": {"web": {"hosts": {}}}}}, "no group 'lab' with hosts"),
        ([1, 2], "no group 'lab' with hosts"),
        (None, "no group 'lab' with hosts"),
        (lab_doc({}), "group 'lab' has no hosts"),
        (lab_doc({"lab1": None}), "host lab1: ansible_host is missing"),
        (lab_doc({"lab1": {"ansible_host": "lab1.example"}}), "'lab1.example' is not an IPv4 address"),
        (lab_doc({"lab1": {"ansible_host": "10.9.0.11"}}), "ansible_host 10.9.0.11 must be in 10.213.0.0/16"),
        (lab_doc({"lab1": {"ansible_host": "10.213.0.1"}}), "other than a segment's .1 (the control node on bridge llmf<N>)"),
        (lab_doc({"lab1": {"ansible_host": "10.213.4.1"}}), "other than a segment's .1"),
        (lab_doc({"lab1": {"ansible_host": "10.213.0.255"}}), "must be in 10.213.0.0/16"),
        (lab_doc({"Lab1": {"ansible_host": "10.213.0.11"}}), "host 'Lab1': name must match"),
        (lab_doc({"labwithlongname": {"ansible_host": "10.213.0.11"}}), "name must match"),
        (
            lab_doc({"lab1": {"ansible_host": "10.213.0.11"}, "lab2": {"ansible_host": "10.213.0.11"}}),
            "hosts lab1 and lab2 share ansible_host 10.213.0.11",
        ),
    ],
)
def test_parse_inventory_refuses_with_a_message_naming_the_problem(doc: object, fragment: str) -> None:
    with pytest.raises(LabError) as err:
        config.parse_inventory(doc, "inv.yml")
    assert fragment in str(err.value)
    assert str(err.value).startswith("inv.yml: ")


def test_load_inventory_missing_file_says_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(LabError, match=r"inventory .*nope\.yml not found: pass -i PATH"):
        config.load_inventory(tmp_path / "nope.yml")


def test_load_inventory_invalid_yaml_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "hosts.yml"
    bad.write_text("lab: [\n")
    with pytest.raises(LabError) as err:
        config.load_inventory(bad)
    assert "not valid YAML" in str(err.value)
    assert "\n" not in str(err.value)


# --- rootfs cache key --------------------------------------------------------------------------


def test_rootfs_key_is_pinned_for_fixed_inputs() -> None:
    # sha256 of {"builder":7,"mirror":...,"packages":[sorted],"suite":...} (canonical JSON), first 16 hex
    spec = RootfsSpec(suite="bookworm", mirror="http://mirror.example/debian", packages=("systemd", "python3"), builder=7)
    assert spec.key() == "c8b9ccf682714340"


def test_rootfs_key_ignores_package_order_and_duplicates() -> None:
    a = RootfsSpec(packages=("systemd", "python3", "curl"))
    b = RootfsSpec(packages=("curl", "systemd", "python3", "curl"))
    assert a.key() == b.key()


@pytest.mark.parametrize(
    "changed",
    [
        RootfsSpec(suite="trixie"),
        RootfsSpec(mirror="http://other.example/debian"),
        RootfsSpec(packages=(*rootfs.PACKAGES, "vim-tiny")),
        RootfsSpec(builder=rootfs.ROOTFS_BUILDER_VERSION + 1),
    ],
)
def test_rootfs_key_changes_with_every_input(changed: RootfsSpec) -> None:
    assert changed.key() != RootfsSpec().key()


def test_rootfs_tarball_lives_in_the_cache_under_suite_and_key(tmp_path: Path) -> None:
    spec = RootfsSpec()
    assert spec.tarball(tmp_path) == tmp_path / "rootfs" / f"bookworm-{spec.key()}.tar"


def test_rootfs_has_what_ansible_vllm_and_systemd_analyze_need() -> None:
    needed = {"systemd", "systemd-sysv", "dbus", "openssh-server", "python3", "python3-venv", "python3-apt", "libnuma1", "man-db"}
    assert needed <= set(rootfs.PACKAGES)


# --- rendered files ----------------------------------------------------------------------------


def test_render_network_is_a_static_address_on_the_lab_bridge() -> None:
    text = network.render_network(ip("10.213.0.12"), ["10.255.255.53", "192.0.2.53"])
    assert text.splitlines()[1:] == [
        "[Match]",
        "Name=host0",
        "",
        "[Network]",
        "Address=10.213.0.12/24",
        "Gateway=10.213.0.1",
        "DNS=10.255.255.53",
        "DNS=192.0.2.53",
        "LinkLocalAddressing=no",
        "IPv6AcceptRA=no",
    ]
    assert text.startswith("# ") and text.endswith("\n")


def test_parse_nameservers_skips_loopback_comments_and_duplicates() -> None:
    text = "# generated\nnameserver 127.0.0.53\nnameserver 10.255.255.53 # upstream\nsearch example\nnameserver 10.255.255.53\n"
    text += "nameserver ::1\nnameserver 2001:db8::53\nnameserver bogus\n"
    assert network.parse_nameservers(text) == ["10.255.255.53", "2001:db8::53"]


def test_render_resolv_and_hosts() -> None:
    assert network.render_resolv(["10.255.255.53"]) == "nameserver 10.255.255.53\n"
    hosts = network.render_hosts([Host("lab1", ip("10.213.0.11")), Host("lab2", ip("10.213.0.12"))])
    assert "10.213.0.11\tlab1\n10.213.0.12\tlab2\n" in hosts
    assert hosts.startswith("127.0.0.1\tlocalhost\n")


def test_render_ssh_config_names_every_host_with_the_lab_key(tmp_path: Path) -> None:
    key = tmp_path / "id_ed25519"
    text = ssh.render_ssh_config([Host("lab1", ip("10.213.0.11")), Host("lab2", ip("10.213.0.12"))], key)
    assert "Host lab1 10.213.0.11\n  HostName 10.213.0.11\n  User root\n" in text
    assert "Host lab2 10.213.0.12\n  HostName 10.213.0.12\n" in text
    assert text.count(f"IdentityFile {key}") == 2


def test_nspawn_argv_boots_without_registering_in_the_hosts_netns(tmp_path: Path) -> None:
    argv = machines.nspawn_argv(Host("lab1", ip("10.213.0.11")), tmp_path / "lab1", tmp_path / "wh")
    assert argv[0] == "systemd-nspawn"
    for flag in ("--boot", "--register=no", "--keep-unit", "--machine=lab1", "--capability=CAP_NET_ADMIN"):
        assert flag in argv
    assert f"--directory={tmp_path / 'lab1'}" in argv
    assert "--network-namespace-path=/run/netns/llmf-lab1" in argv
    assert f"--bind-ro={tmp_path / 'wh'}:/srv/llmfleet/wheelhouse" in argv
    assert machines.is_our_nspawn(argv, tmp_path / "lab1")
    assert not machines.is_our_nspawn(argv, tmp_path / "lab2")
    assert not machines.is_our_nspawn(["/usr/bin/sleep", f"--directory={tmp_path / 'lab1'}"], tmp_path / "lab1")


# --- network rules: only ours, always tagged ---------------------------------------------------


def test_nat_rules_are_tagged_and_only_concern_the_lab_subnet() -> None:
    rules = network.nat_rules("eth0")
    assert [(table, rule[0]) for table, rule in rules] == [("nat", "POSTROUTING"), ("filter", "FORWARD"), ("filter", "FORWARD")]
    for _, rule in rules:
        assert rule[rule.index("--comment") + 1] == "llmfleet-lab"
        addresses = [rule[i + 1] for i, arg in enumerate(rule) if arg in ("-s", "-d")]
        assert addresses and set(addresses) == {"10.213.0.0/16"}
    assert rules[0][1][rules[0][1].index("-o") + 1] == "eth0"


def test_each_segment_of_the_lab_range_is_a_bridge_with_the_control_node_on_its_first_address() -> None:
    default, site = Host("lab1", ip("10.213.0.11")), Host("fl4", ip("10.213.2.24"))
    assert (default.bridge, str(default.gateway), str(default.segment)) == ("llmf0", "10.213.0.1", "10.213.0.0/24")
    assert (site.bridge, str(site.gateway), str(site.segment)) == ("llmf2", "10.213.2.1", "10.213.2.0/24")
    assert "Gateway=10.213.2.1" in network.render_network(ip("10.213.2.24"), []).splitlines()


def test_owned_rule_deletions_pick_only_rules_tagged_as_the_labs() -> None:
    listing = "\n".join(
        [
            "-P FORWARD ACCEPT",
            '-A FORWARD -s 10.213.0.0/24 -m comment --comment "llmfleet-lab" -j ACCEPT',
            "-A FORWARD -s 10.213.0.0/24 -m comment --comment llmfleet-lab-other -j ACCEPT",
            "-A FORWARD -i docker0 -j ACCEPT",
            "-A FORWARD -d 10.213.0.0/24 -m conntrack --ctstate RELATED,ESTABLISHED -m comment --comment llmfleet-lab -j ACCEPT",
        ]
    )
    tag = ["-m", "comment", "--comment", "llmfleet-lab"]
    assert network.owned_rule_deletions(listing) == [
        ["-D", "FORWARD", "-s", "10.213.0.0/24", *tag, "-j", "ACCEPT"],
        ["-D", "FORWARD", "-d", "10.213.0.0/24", "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", *tag, "-j", "ACCEPT"],
    ]


# --- prerequisites and refusals ----------------------------------------------------------------


def test_missing_tool_names_the_package_to_install() -> None:
    def which(name: str) -> str | None:
        return None if name == "systemd-nspawn" else f"/usr/bin/{name}"

    with pytest.raises(LabError) as err:
        system.require_tools(cli.UP_TOOLS, which)
    assert str(err.value) == "systemd-nspawn not found: apt-get install systemd-container"


def test_several_missing_tools_give_one_install_line() -> None:
    missing = system.missing_tools(["ssh", "ssh-keygen", "debootstrap", "tar"], lambda name: "/bin/tar" if name == "tar" else None)
    assert missing == ["ssh", "ssh-keygen", "debootstrap"]
    assert system.missing_tools_message(missing) == "ssh, ssh-keygen, debootstrap not found: apt-get install debootstrap openssh-client"


def run_main(capsys: pytest.CaptureFixture[str], tmp_path: Path, *argv: str) -> tuple[int, str, str]:
    paths = config.LabPaths(repo=tmp_path / "repo", cache=tmp_path / "cache")
    code = cli.main(list(argv), paths)
    out, err = capsys.readouterr()
    return code, out, err


def test_main_reports_a_missing_inventory_in_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, err = run_main(capsys, tmp_path, "status")
    assert code == ExitCode.ERROR
    assert int(ExitCode.ERROR) == 1
    assert err.count("\n") == 1 and err.startswith("error: inventory ") and "Traceback" not in err
    assert out == ""


def test_main_up_refuses_without_root(capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    code, _, err = run_main(capsys, tmp_path, "up", "-i", str(REPO / "inventory" / "lab" / "hosts.yml"))
    assert code == ExitCode.ERROR
    assert err == "error: `lab up` needs root (systemd-nspawn, network namespaces, iptables): run it as root\n"


def test_main_up_names_a_missing_prerequisite(capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None if name == "systemd-nspawn" else "/bin/true")
    code, _, err = run_main(capsys, tmp_path, "up", "-i", str(REPO / "inventory" / "lab"))
    assert code == ExitCode.ERROR
    assert err == "error: systemd-nspawn not found: apt-get install systemd-container\n"
    assert not (tmp_path / "repo" / ".lab").exists()  # refused before touching anything


def test_bad_command_line_exits_1_with_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_:
        run_main(capsys, tmp_path, "frobnicate")
    assert exit_.value.code == ExitCode.ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid choice: 'frobnicate'" in err


# --- files written into machine roots ----------------------------------------------------------


def test_write_file_is_atomic_idempotent_and_sets_mode(tmp_path: Path) -> None:
    assert system.write_file(tmp_path, "root/.ssh/authorized_keys", "key\n", 0o600)
    target = tmp_path / "root/.ssh/authorized_keys"
    assert target.read_text() == "key\n" and (target.stat().st_mode & 0o777) == 0o600
    assert not system.write_file(tmp_path, "root/.ssh/authorized_keys", "key\n", 0o600)
    assert system.write_file(tmp_path, "root/.ssh/authorized_keys", "other\n", 0o600)


def test_write_file_replaces_a_symlink_instead_of_writing_through_it(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.write_text("host file\n")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/resolv.conf").symlink_to(outside)
    system.write_file(root, "etc/resolv.conf", "nameserver 10.255.255.53\n")
    assert outside.read_text() == "host file\n"
    assert not (root / "etc/resolv.conf").is_symlink()


def test_write_file_refuses_a_symlinked_directory(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "root"
    root.mkdir()
    (root / "etc").symlink_to(outside)
    with pytest.raises(LabError, match="symlink"):
        system.write_file(root, "etc/hostname", "lab1\n")
    assert list(outside.iterdir()) == []


def test_slim_keeps_copyrights_and_drops_docs_and_translations(tmp_path: Path) -> None:
    for name in ("usr/share/doc/curl/copyright", "usr/share/doc/curl/changelog.gz", "usr/share/locale/de/LC_MESSAGES/apt.mo"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    (tmp_path / "usr/share/locale/locale.alias").write_text("x")
    (tmp_path / "usr/share/man/man8").mkdir(parents=True)
    (tmp_path / "usr/share/man/man8/sshd.8.gz").write_text("x")
    rootfs._slim(tmp_path)
    assert (tmp_path / "usr/share/doc/curl/copyright").exists()
    assert not (tmp_path / "usr/share/doc/curl/changelog.gz").exists()
    assert not (tmp_path / "usr/share/locale/de").exists()
    assert (tmp_path / "usr/share/locale/locale.alias").exists()
    assert (tmp_path / "usr/share/man/man8/sshd.8.gz").exists()  # systemd-analyze verify resolves man: links
    assert "path-exclude /usr/share/doc/*" in (tmp_path / "etc/dpkg/dpkg.cfg.d/llmfleet-slim").read_text()


def test_strip_identity_leaves_no_host_specific_state(tmp_path: Path) -> None:
    for name in ("etc/machine-id", "etc/hostname", "etc/resolv.conf", "etc/ssh/ssh_host_ed25519_key", "var/lib/dbus/machine-id"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x\n")
    (tmp_path / "etc/ssh/sshd_config").write_text("x\n")
    rootfs._strip_identity(tmp_path)
    assert (tmp_path / "etc/machine-id").read_text() == ""
    assert os.readlink(tmp_path / "var/lib/dbus/machine-id") == "/etc/machine-id"
    assert sorted(p.name for p in (tmp_path / "etc/ssh").iterdir()) == ["sshd_config"]
    assert not (tmp_path / "etc/hostname").exists() and not (tmp_path / "etc/resolv.conf").exists()


def test_tail_strips_colours_and_blank_lines(tmp_path: Path) -> None:
    log = tmp_path / "lab1.log"
    log.write_text("\r\n".join(["one", "", "[\x1b[0;32m  OK  \x1b[0m] Started ssh.service", ""] * 2))
    assert ssh._tail(log, 3).splitlines() == ["    [  OK  ] Started ssh.service", "    one", "    [  OK  ] Started ssh.service"]
    assert ssh._tail(tmp_path / "missing.log") == "(no console log)"


# --- cgroups: each host in its own subtree -----------------------------------------------------

MOUNTINFO = """\
24 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard
30 24 0:26 / /sys/fs/cgroup ro - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
38 30 0:34 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
39 30 0:35 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
PROC_CGROUP = "9:name=systemd:/\n4:memory:/process_api/a2d\n1:cpu,cpuacct:/\n0::/\n"


def test_parse_cgroup_mounts_finds_cgroup2_and_the_systemd_hierarchy() -> None:
    assert machines.parse_cgroup_mounts(MOUNTINFO) == {"": Path("/sys/fs/cgroup/unified"), "name=systemd": Path("/sys/fs/cgroup/systemd")}


def test_parse_own_cgroups_splits_joined_controllers() -> None:
    own = machines.parse_own_cgroups(PROC_CGROUP)
    assert own == {"name=systemd": "/", "memory": "/process_api/a2d", "cpu": "/", "cpuacct": "/", "": "/"}


def test_host_cgroups_are_below_our_own_cgroup_and_named_after_the_host() -> None:
    assert machines.host_cgroups("lab1", MOUNTINFO, PROC_CGROUP) == [
        Path("/sys/fs/cgroup/unified/llmfleet-lab/lab1"),
        Path("/sys/fs/cgroup/systemd/llmfleet-lab/lab1"),
    ]
    unified_only = "40 30 0:35 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"
    assert machines.host_cgroups("lab2", unified_only, "0::/user.slice/session-1.scope\n") == [
        Path("/sys/fs/cgroup/user.slice/session-1.scope/llmfleet-lab/lab2")
    ]


def test_down_of_one_inventory_leaves_hosts_another_inventory_booted(tmp_path: Path) -> None:
    paths = config.LabPaths(repo=tmp_path / "repo", cache=tmp_path / "cache")
    paths.run.mkdir(parents=True)
    small, fleet = tmp_path / "lab.yml", tmp_path / "fleet.yml"
    small.write_text("lab:\n  hosts:\n    lab1: {ansible_host: 10.213.0.11}\n")
    fleet.write_text("lab:\n  hosts:\n    fl1: {ansible_host: 10.213.0.21}\n")
    config.record_host(paths, Host("lab1", ip("10.213.0.11")), small)
    config.record_host(paths, Host("old", ip("10.213.0.13")), small)  # dropped from the inventory since
    config.record_host(paths, Host("fl1", ip("10.213.0.21")), fleet)
    for name in ("lab1", "old", "fl1", "orphan"):  # orphan: booted before records existed
        paths.pidfile(name).write_text("1\n")
    assert config.known_host_names(small, paths) == ["lab1", "old", "orphan"]
    assert config.known_host_names(fleet, paths) == ["fl1", "orphan"]
    assert [h.name for h in config.recorded_hosts(paths)] == ["fl1", "lab1", "old"]


def test_the_lab_folder_is_llmfleet_lab_dir_when_set_as_for_ansible(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = config.LabPaths(repo=tmp_path / "repo", cache=tmp_path / "cache")
    monkeypatch.delenv("LLMFLEET_LAB_DIR", raising=False)
    assert paths.lab == tmp_path / "repo" / ".lab"
    monkeypatch.setenv("LLMFLEET_LAB_DIR", str(tmp_path / "shared"))
    assert paths.lab == tmp_path / "shared" and paths.key == tmp_path / "shared" / "ssh" / "id_ed25519"


def test_status_check_names_the_hosts_that_are_down_and_the_command_that_starts_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    inventory = tmp_path / "hosts.yml"
    inventory.write_text(yaml.safe_dump(lab_doc({"lab1": {"ansible_host": "10.213.0.11"}, "lab2": {"ansible_host": "10.213.0.12"}})))
    paths = config.LabPaths(repo=tmp_path / "repo", cache=tmp_path / "cache")
    up = {"lab1": True, "lab2": False}
    monkeypatch.setattr(
        cli, "host_status", lambda h, p: cli.HostStatus(h.name, str(h.ip), up[h.name], 7 if up[h.name] else None, up[h.name])
    )
    assert cli.main(["status", "--check", "-i", str(inventory)], paths) == 3
    err = capsys.readouterr().err
    assert "lab2 is not running or not reachable over ssh" in err and f"tools/lab.py up -i {inventory}" in err and "make lab-up" in err
    up["lab2"] = True
    assert cli.main(["status", "--check", "-i", str(inventory)], paths) == 0
    assert "lab1, lab2 running, ssh ready" in capsys.readouterr().out


def test_up_says_what_it_waits_for(capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The steps of `up` that take a while (unpacking roots, booting until ssh answers) each print a line first."""

    class Proc:
        pid = 4242

    tarball = tmp_path / "cache" / "rootfs.tar"
    for name, fake in {
        "require_root": lambda command: None,
        "require_tools": lambda names, which=None: None,
        "ensure_ssh_key": lambda paths: None,
        "find_nspawn": lambda root, pidfile: None,
        "ensure_bridge": lambda segment=None: None,
        "ensure_nat": lambda paths: None,
        "ensure_rootfs": lambda spec, paths, console: tarball,
        "ensure_machine_root": lambda host, hosts, tarball, paths: True,
        "ensure_host_link": lambda host: None,
        "start_host": lambda host, paths: Proc(),
        "wait_for_ssh": lambda started, hosts, paths, timeout: None,
    }.items():
        monkeypatch.setattr(cli, name, fake)
    code, out, _ = run_main(capsys, tmp_path, "up", "-i", str(REPO / "inventory" / "lab" / "hosts.yml"))
    assert code == ExitCode.OK
    lines = out.splitlines()
    assert "lab1, lab2: unpacking machine roots from rootfs.tar…" in lines
    assert "lab1, lab2: booting, waiting for ssh (at most 90 s)…" in lines
    assert lines.index("lab1, lab2: booting, waiting for ssh (at most 90 s)…") < lines.index(
        "lab1: started (pid 4242, 10.213.0.11), ssh ready after 0 s"
    )


def test_destroy_removes_the_machine_roots_of_its_inventory_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A scenario's destroy gives its disk back without touching the README lab's hosts."""
    paths = config.LabPaths(repo=tmp_path / "repo", cache=tmp_path / "cache")
    paths.run.mkdir(parents=True)
    small, scenario = tmp_path / "lab.yml", tmp_path / "scenario.yml"
    small.write_text("lab:\n  hosts:\n    lab1: {ansible_host: 10.213.0.11}\n")
    scenario.write_text("lab:\n  hosts:\n    mlab1: {ansible_host: 10.213.9.11}\n")
    config.record_host(paths, Host("gone", ip("10.213.9.12")), scenario)  # booted by it, dropped from it since
    paths.pidfile("gone").write_text("1\n")
    for name in ("lab1", "mlab1", "gone"):
        (paths.machine(name) / "etc").mkdir(parents=True)
    downs: list[Path] = []
    monkeypatch.setattr(cli, "cmd_down", lambda args, p, console: downs.append(args.inventory) or cli.ExitCode.OK)
    args = argparse.Namespace(inventory=scenario)
    assert cli.cmd_destroy(args, paths, Console(file=io.StringIO())) == cli.ExitCode.OK
    assert downs == [scenario]
    assert sorted(p.name for p in paths.machines.iterdir()) == ["lab1"]
    assert cli.cmd_destroy(argparse.Namespace(inventory=small), paths, Console(file=io.StringIO())) == cli.ExitCode.OK
    assert not paths.machines.exists()
