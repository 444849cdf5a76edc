"""The contract of roles/nvidia_driver on a Debian 12 host without a GPU (tests/molecule/driver)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[4]
# tools/lab.py writes an ssh_config for the lab hosts (testinfra does not template inventory vars)
_LAB_DIR = Path(os.environ.get("LLMFLEET_LAB_DIR") or REPO / ".lab")
testinfra_hosts = [f"ssh://drv1?ssh_config={_LAB_DIR / 'ssh_config'}"]

VERSION = "535.261.03-1"  # the scenario profile's debian-12 pin (inventory/group_vars/lab.yml)
PACKAGES = ["nvidia-kernel-dkms", "nvidia-smi", "libnvidia-ml1", "libcuda1"]


def test_non_free_source(host):
    f = host.file("/etc/apt/sources.list.d/llmfleet-nvidia-driver.sources")
    assert f.is_file and f.mode == 0o644
    assert "Components: non-free non-free-firmware" in f.content_string
    assert "Suites: bookworm bookworm-updates" in f.content_string


def test_pin_file_pins_the_exact_version(host):
    text = host.file("/etc/apt/preferences.d/llmfleet-nvidia-driver").content_string
    assert f"Pin: version {VERSION}\nPin-Priority: 1001" in text
    assert "Pin: version *\nPin-Priority: -1" in text
    for name in PACKAGES:
        assert name in text


@pytest.mark.parametrize("name", PACKAGES)
def test_apt_candidate_is_the_pin(host, name):
    """apt itself, with the real non-free archive: the candidate is the pinned version, nothing else installable."""
    out = host.check_output(f"apt-cache policy {name}")
    candidate = next(line.split(":", 1)[1].strip() for line in out.splitlines() if "Candidate:" in line)
    assert candidate == VERSION, out


@pytest.mark.parametrize("name", PACKAGES)
def test_held(host, name):
    assert name in host.check_output("apt-mark showhold").split()


def test_unattended_upgrades_blacklist(host):
    f = host.file("/etc/apt/apt.conf.d/51llmfleet-nvidia-driver-unattended")
    assert f.is_file
    # apt's own parser reads it back as a list (unattended-upgrades reads the same key)
    dump = host.check_output("apt-config dump Unattended-Upgrade::Package-Blacklist")
    for entry in ("nvidia-", "libnvidia-", "libcuda", "linux-modules-nvidia-"):
        assert f'Unattended-Upgrade::Package-Blacklist:: "{entry}";' in dump, dump


def test_persistence_unit_enabled_not_started_without_gpu(host):
    unit = host.file("/etc/systemd/system/nvidia-persistenced.service")
    assert "--persistence-mode" in unit.content_string
    assert "ConditionPathExists=/dev/nvidiactl" in unit.content_string
    assert host.check_output("systemctl is-enabled nvidia-persistenced.service") == "enabled"
    assert not host.service("nvidia-persistenced").is_running


def test_no_reboot_was_asked_for(host):
    """Nothing was installed, no module is loaded: no reboot pending, no /run/reboot-required."""
    assert not host.file("/run/reboot-required").exists
