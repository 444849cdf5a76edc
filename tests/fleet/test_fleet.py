"""Fleet rollout on the lab fleet: batches, gates, rollback, faults, drift, store repair and gc.

The scenarios run in file order on one fleet; each starts from the state the previous one left:
G0 is the lock's tiny model, G2 and G4 are new pins of it (changed generation_config, extra file),
"broken" a pin vLLM cannot load (config.json disagrees with the weights).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from llmfleet.artifacts.cache import sha256_file
from testhub import TestHub

from .conftest import (
    CACHE,
    FIGURES,
    HOSTS,
    INVENTORY,
    MIRRORS,
    REPO,
    ROOT,
    SITE_HOSTS,
    Downtime,
    Run,
    Variant,
    assert_restarted_into,
    assert_serving,
    current,
    edit_json,
    env,
    generations,
    health,
    history,
    hub_variant,
    machine_path,
    playbook,
    served_process,
    served_root,
    sites,
    ssh,
    variant,
)

pytestmark = pytest.mark.fleet

STATE: dict[str, Any] = {}
#: the bulk of the new revision the batch-by-batch rollout brings (random: nothing compresses it)
NEW_BYTES = 256 << 20


def new_bytes(v: Variant) -> int:
    """Bytes of the variant's files that the lock's own pin does not have (what a site has not seen)."""
    old = {f["sha256"] for f in json.loads((REPO / "pins" / "lock.json").read_text())["models"]["tiny-llama"]["files"]}
    return sum(p.stat().st_size for p in v.files.values() if sha256_file(p) not in old)
RECAP = re.compile(r"^(fl\d)\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.MULTILINE)
TASK = re.compile(r"^TASK \[(?:[\w.]+ : )?(.+?)\] \*+$")
STATUS = re.compile(r"^(ok|changed|skipping|fatal|failed): \[(fl\d)\]")
#: the task of roles/vllm_service that points `current` at a generation (the switch)
SWITCH_TASK = "Service | Point current at the generation"


def plans(lock: Path | None = None, inventory: Path = INVENTORY) -> dict[str, dict[str, Any]]:
    """What the control node plans for each host (tools/plan.py), independent of what the hosts hold."""
    extra = {"LLMFLEET_LOCK": str(lock)} if lock else {}
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "plan.py"), "-i", str(inventory), "--json"],
        cwd=REPO, env=env(**extra), capture_output=True, text=True, check=False,
    )
    doc = json.loads(proc.stdout)
    assert doc["ok"], doc
    return dict(doc["plans"])


def planned(lock: Path | None = None, inventory: Path = INVENTORY) -> dict[str, str]:
    return {host: plan["generation"] for host, plan in plans(lock, inventory).items()}


def recap(run: Run) -> dict[str, dict[str, int]]:
    return {m[0]: {"ok": int(m[1]), "changed": int(m[2]), "unreachable": int(m[3]), "failed": int(m[4])} for m in RECAP.findall(run.output)}


def per_host_seconds(run: Run) -> dict[str, Any]:
    if not run.summary:
        return {}
    return {h: v.get("duration_s") for h, v in sorted(run.summary["hosts"].items())}


def test_first_rollout_serves_the_planned_generation_everywhere(fleet: Run) -> None:
    g0 = planned()
    STATE["G0"] = g0
    assert_serving(HOSTS, g0)
    for host in HOSTS:
        assert [e["generation"] for e in history(host)] == [g0[host]]
        assert machine_path(host, f"{ROOT}/generations/{g0[host]}/verified.json").is_file()
        assert fleet.host_summary(host)["verify"] == "passed"
        assert fleet.host_summary(host)["generation_after"] == g0[host]


def test_no_change_rollout_changes_nothing_and_skips_verified_hosts() -> None:
    # every stage (what a no-change rollout did before the fast path), then the fast path
    full = playbook("site.yml", "-e", "rollout_fast_path=false")
    run = playbook("site.yml")
    for r in (full, run):
        assert r.rc == 0, r.failures()
        counts = recap(r)
        assert set(counts) == set(HOSTS)
        assert all(c["changed"] == 0 and c["failed"] == 0 for c in counts.values()), counts
        assert_serving(HOSTS, STATE["G0"])
        for host in HOSTS:
            summary = r.host_summary(host)
            assert summary["verify"] == "skipped" and not summary.get("switched")
    for host in HOSTS:
        assert not full.host_summary(host)["converged"] and run.host_summary(host)["converged"]
    # the least work that proves it, in the rollout: one probe of the host, the decision, the report
    # (every stage: ~60 there). Around it the run validates (one plan a host), includes the plan tasks
    # (once in the mirrors play, once in the rollout) and groups the hosts by site: 7 in the recap of a
    # host that is not a mirror; a mirror host also runs the mirror's own tasks, which find it full.
    fast, every = play_tasks(run, ROLLOUT_PLAY), play_tasks(full, ROLLOUT_PLAY)
    assert set(fast) == set(HOSTS) and all(n <= 3 for n in fast.values()), fast
    assert all(n > 40 for n in every.values()), every
    mirror_hosts = set(MIRRORS.values())
    assert all(c["ok"] <= 7 for h, c in recap(run).items() if h not in mirror_hosts), recap(run)
    FIGURES["no-change rollout of the converged fleet (batches 1, 25 %, 100 %), s"] = round(run.wall_s, 1)
    FIGURES["no-change rollout, per host, s"] = per_host_seconds(run)
    FIGURES["no-change rollout, every stage (rollout_fast_path=false, as before the fast path), s"] = round(full.wall_s, 1)
    FIGURES["no-change rollout, every stage, per host, s"] = per_host_seconds(full)
    FIGURES["no-change rollout, tasks ok per host: fast path / every stage"] = f"{recap(run)['fl1']['ok']} / {recap(full)['fl1']['ok']}"


PLAY = re.compile(r"^PLAY \[(.+?)\] \*+$")
ROLLOUT_PLAY = "Rollout | Canary, then growing batches"


def play_tasks(run: Run, play: str) -> dict[str, int]:
    """host -> tasks that ran for it (ok or changed; a loop counts once) in every batch of the play ``play``."""
    counts: dict[str, int] = {}
    in_play, seen = False, set()
    for line in run.output.splitlines():
        m = PLAY.match(line)
        if m:
            in_play, seen = m.group(1) == play, set()
            continue
        if TASK.match(line):
            seen = set()
            continue
        m = STATUS.match(line)
        if in_play and m and m.group(1) in ("ok", "changed") and m.group(2) not in seen:
            seen.add(m.group(2))
            counts[m.group(2)] = counts.get(m.group(2), 0) + 1
    return counts


def task_statuses(run: Run, task: str) -> dict[str, str]:
    """host -> what the default callback printed for ``task`` (ok, changed, skipping, fatal): a loop's
    changed item wins over its ok ones; a task run again for the same host keeps the last run."""
    out: dict[str, str] = {}
    name, seen = "", {}
    for line in run.output.splitlines():
        m = TASK.match(line)
        if m:
            name, seen = m.group(1), {}
            continue
        m = STATUS.match(line)
        if m and name == task:
            status, host = m.groups()
            seen[host] = "changed" if "changed" in (status, seen.get(host)) else status
            out[host] = seen[host]
    return out


def test_check_diff_on_the_converged_fleet_reports_no_change() -> None:
    # every stage in check mode (the fast path would end each host after its probe: no_change covers it)
    run = playbook("site.yml", "--check", "--diff", "-e", '{"rollout_batches": ["100%"]}', "-e", "rollout_fast_path=false")
    assert run.rc == 0, run.failures()
    assert all(c["changed"] == 0 for c in recap(run).values()), recap(run)
    # no change because nothing would change, not because check mode skipped the stages
    assert task_statuses(run, SWITCH_TASK) == dict.fromkeys(HOSTS, "ok"), task_statuses(run, SWITCH_TASK)


def test_check_diff_of_a_pin_change_reports_the_switch_and_touches_nothing(scratch: Path) -> None:
    v = variant(scratch, "c1", lambda d: edit_json(d / "generation_config.json", top_k=3))
    target = planned(v.lock)
    before = {h: (current(h), generations(h), served_process(h).pid) for h in HOSTS}
    run = playbook("site.yml", "--check", "--diff", "-e", '{"rollout_batches": ["100%"]}', *v.extra_vars(), lock=v.lock)
    assert run.rc == 0, run.failures()
    assert task_statuses(run, SWITCH_TASK) == dict.fromkeys(HOSTS, "changed"), task_statuses(run, SWITCH_TASK)
    assert all(c["changed"] >= 1 and c["failed"] == 0 for c in recap(run).values()), recap(run)
    for host in HOSTS:
        assert run.host_summary(host)["generation_after"] == target[host]
        assert (current(host), generations(host), served_process(host).pid) == before[host], f"check mode changed {host}"
        assert not machine_path(host, v.store_path()).exists()
        assert not machine_path(host, v.store_path() + ".partial").exists()
        assert health(host) == 200


def drift(*args: str) -> tuple[int, dict[str, Any]]:
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "drift.py"), "-i", str(INVENTORY), "--json", *args],
        cwd=REPO, env=env(), capture_output=True, text=True, timeout=300, check=False,
    )
    return proc.returncode, json.loads(proc.stdout)


def test_drift_names_a_changed_unit_and_the_switch_repairs_it() -> None:
    rc, doc = drift()
    assert rc == 0, doc
    unit = machine_path("fl4", "/etc/systemd/system/llmfleet-vllm@.service")
    unit.write_text(unit.read_text() + "# edited by hand\n")
    rc, doc = drift()
    assert rc == 3
    assert {h for h, v in doc["hosts"].items() if v["drift"]} == {"fl4"}
    assert [d["what"] for d in doc["hosts"]["fl4"]["drift"]] == ["unit-changed"]
    run = playbook("playbooks/switch.yml", "-l", "fl4")
    assert run.rc == 0 and recap(run)["fl4"]["changed"] >= 1, run.failures()
    assert drift()[0] == 0


def main_pid(host: str, unit: str = "llmfleet-vllm@tiny.service") -> int:
    return int(ssh(host, f"systemctl show -p MainPID --value {unit}").strip() or 0)


def store_check(host: str) -> int:
    """Run the host's scheduled full check of the store now; its exit status (0 intact, 3 damage found)."""
    unit = "llmfleet-store-check.service"
    return int(ssh(host, f"systemctl start {unit}; systemctl show -p ExecMainStatus --value {unit}", check=False).strip() or -1)


def store_path(host: str) -> str:
    plan = json.loads(machine_path(host, f"{ROOT}/current/plan.json").read_text())
    return str(plan["models"]["tiny-llama"]["store_path"])


def test_one_byte_appended_to_a_store_file_is_found_repaired_and_served_from_a_good_path() -> None:
    path = store_path("fl1")
    store = machine_path("fl1", path)
    weights = store / "model.safetensors"
    size, inode, pid = weights.stat().st_size, store.stat().st_ino, main_pid("fl1")
    # the host's timer: a full check, its textfile and record
    assert store_check("fl1") == 0
    prom = machine_path("fl1", "/var/lib/prometheus/node-exporter/llmfleet_store.prom").read_text()
    assert f'llmfleet_store_path_ok{{path="{path}",kind="model",current="true"}} 1' in prom, prom
    with weights.open("ab") as f:
        f.write(b"\x00")  # one byte appended
    assert store_check("fl1") == 3
    prom = machine_path("fl1", "/var/lib/prometheus/node-exporter/llmfleet_store.prom").read_text()
    assert f'llmfleet_store_path_ok{{path="{path}",kind="model",current="true"}} 0' in prom, prom
    rc, doc = drift("-l", "fl1", "--no-hash")
    assert rc == 3 and [d["what"] for d in doc["hosts"]["fl1"]["drift"]] == ["model-file-changed"], doc["hosts"]["fl1"]

    watch = Downtime("fl1")
    run = playbook("site.yml", "-l", "fl1")
    down = watch.stop()
    assert run.rc == 0, run.failures()
    summary = run.host_summary("fl1")
    assert summary["repaired"] == [os.path.basename(path)] and not summary["switched"] and summary["verify"] == "passed", summary
    assert store.stat().st_ino != inode, "the damaged path was not rebuilt beside itself"
    assert weights.stat().st_size == size
    assert main_pid("fl1") not in (0, pid), "the instance still runs the process that loaded the damaged file"
    assert served_root("fl1") == path and health("fl1") == 200
    assert not machine_path("fl1", f"{ROOT}/pending-restart.json").exists()
    assert_serving(["fl1"], STATE["G0"])
    rc, doc = drift("-l", "fl1")  # every weight hashed
    assert rc == 0 and doc["hosts"]["fl1"]["drift"] == [], doc["hosts"]["fl1"]
    assert store_check("fl1") == 0
    FIGURES["a damaged store file: repair rollout of fl1 (rebuild beside, restart, verify), s"] = round(run.wall_s, 1)
    FIGURES["a damaged store file: fl1 down while it restarted on the rebuilt path, s"] = down


def test_a_file_corrupted_upstream_is_refused_by_the_mirror_and_fl1_keeps_serving(scratch: Path) -> None:
    # the file the new revision changes is new to the site: the mirror must fetch it (one the mirror
    # holds already, by content, is never fetched again, however the upstream's copy rots)
    v = variant(scratch, "r3", lambda d: edit_json(d / "generation_config.json", top_k=7))
    good = sha256_file(v.files["generation_config.json"])
    with v.files["generation_config.json"].open("r+b") as f:  # the upstream now serves bytes the pin does not name
        byte = f.read(1)
        f.seek(0)
        f.write(bytes([byte[0] ^ 0x20]))
    run = playbook("site.yml", "-l", "fl1", *v.extra_vars(), lock=v.lock)
    assert run.rc != 0, run.failures()
    assert "the mirror of site site-a on fl1 could not be filled" in run.output, run.failures()
    assert f"!= pinned {good}; the download was deleted and nothing of it is used" in run.output, run.failures()
    assert not machine_path("fl1", f"/srv/llmfleet/mirror/sha256/{good}").exists()
    assert not machine_path("fl1", v.store_path()).exists()
    assert_serving(["fl1"], STATE["G0"])
    assert run.host_summary("fl1")["generation_after"] in (None, STATE["G0"]["fl1"])
    (scratch / "blobs" / "sha256" / good).unlink()  # the corrupted file is offered no more


def test_a_transfer_killed_half_way_leaves_nothing_visible_and_the_next_run_resumes_it(scratch: Path) -> None:
    def change(d: Path) -> None:
        edit_json(d / "generation_config.json", top_k=9)
        with (d / "padding.bin").open("wb") as f:  # big enough to kill the copy in flight
            f.truncate(384 << 20)

    v = variant(scratch, "r4", change)
    store = machine_path("fl1", v.store_path())
    partial = store.with_name(store.name + ".partial")
    argv = [str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(INVENTORY), "site.yml", "-l", "fl1", *v.extra_vars()]
    proc = subprocess.Popen(argv, cwd=REPO, env=env(LLMFLEET_LOCK=str(v.lock)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not (partial / "model.safetensors").exists():  # the copy has reached padding.bin
            assert proc.poll() is None, "the rollout ended before the copy could be killed"
            assert time.monotonic() < deadline, "the model copy never started"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert not store.exists(), "a killed transfer left a visible store path"
    assert not (partial / ".llmfleet-complete").exists()
    assert_serving(["fl1"], STATE["G0"])
    copied = (partial / "model.safetensors").stat().st_ino  # sent before the kill

    run = playbook("site.yml", "-l", "fl1", *v.extra_vars(), lock=v.lock)
    assert run.rc == 0, run.failures()
    assert (store / ".llmfleet-complete").is_file() and not partial.exists()
    assert (store / "model.safetensors").stat().st_ino == copied, "the next run sent a file again that the killed one had sent"
    assert (store / "padding.bin").stat().st_size == 384 << 20
    STATE["G4"] = planned(v.lock)
    assert_serving(["fl1"], STATE["G4"])
    assert served_root("fl1") == v.store_path()


def test_a_good_pin_change_reaches_every_host_batch_by_batch_and_crosses_each_sites_wan_once(scratch: Path, hub: TestHub) -> None:
    def change(d: Path) -> None:
        edit_json(d / "generation_config.json", top_k=5)
        (d / "padding.bin").write_bytes(os.urandom(NEW_BYTES))  # the bulk of a new revision: its bytes cross each WAN once

    started = time.monotonic()
    v = hub_variant(hub, scratch, "r2", change, include=("padding.bin",))
    FIGURES["new revision of the tiny model: pin.py model add + fetch from the test hub, s"] = round(time.monotonic() - started, 1)
    pin = json.loads(v.lock.read_text())["models"]["tiny-llama"]
    assert pin["source"] == "hf://llmfleet-lab/tiny-llama" and pin["revision"] == hub.repos["llmfleet-lab/tiny-llama"].refs["main"]
    STATE["v2"] = v
    STATE["G2"] = g2 = planned(v.lock)
    new = new_bytes(v)
    assert new > NEW_BYTES
    sites().wan.reset()
    watch = Downtime("fl3")
    run = playbook("site.yml", *v.extra_vars(), lock=v.lock)
    down = watch.stop()
    wan = sites().wan.read()
    assert run.rc == 0, run.failures()
    for site, counts in wan.items():
        ratio = counts["upstream"] / new
        FIGURES[f"new pin, {site} ({len(SITE_HOSTS[site])} hosts): WAN bytes from the upstream / the pin's new bytes"] = (
            f"{counts['upstream']} / {new} = {ratio:.4f} (all bytes the control node sent over the link: {counts['total']})"
        )
        assert 1.0 <= ratio <= 1.05, f"{site}: {counts['upstream']} bytes crossed its WAN for {new} new bytes"
    assert_serving(HOSTS, g2)
    for host in HOSTS:
        assert served_root(host) == v.store_path()
        assert machine_path(host, f"{ROOT}/generations/{g2[host]}/verified.json").is_file()
        summary = run.host_summary(host)
        assert summary["switched"] and summary["verify"] == "passed" and not summary.get("rolled_back")
    batches = {h: run.host_summary(h).get("batch") for h in HOSTS}
    assert batches == {"fl1": 1, "fl2": 2, "fl3": 3, "fl4": 3}, batches
    FIGURES["full rollout of a new model pin (batches 1, 25 %, 100 %; cold mirrors), s"] = round(run.wall_s, 1)
    FIGURES["full rollout, per host, s"] = per_host_seconds(run)
    FIGURES["switch downtime of fl3 (restart of its instance), s"] = down


def test_manual_rollback_restarts_fl2_into_the_previous_generation() -> None:
    """Not only the pointer and the history: the process that serves is G0's, started by the rollback."""
    g0 = plans()["fl2"]  # the lock's pin, as the control node plans it
    assert g0["generation"] == STATE["G0"]["fl2"]
    before = served_process("fl2")
    assert before.argv != g0["instances"][0]["argv"], "fl2 already runs G0's argv: the scenario before did not switch it"
    began = time.monotonic()
    watch = Downtime("fl2")
    run = playbook("playbooks/rollback.yml", "-l", "fl2")
    down = watch.stop()
    assert run.rc == 0, run.failures()
    assert_serving(["fl2"], STATE["G0"])
    assert history("fl2")[-1]["reason"].startswith("manual rollback")
    assert_restarted_into("fl2", g0, before, began, watch)
    rc, doc = drift("-l", "fl2")
    assert rc == 0 and not doc["hosts"]["fl2"]["drift"], doc["hosts"]["fl2"]
    FIGURES["manual rollback downtime of fl2 (G2 -> G0), s"] = down
    FIGURES["manual rollback wall time (playbooks/rollback.yml -l fl2), s"] = round(run.wall_s, 1)


def test_a_rollout_after_the_manual_rollback_brings_fl2_forward_again() -> None:
    v: Variant = STATE["v2"]
    g2 = plans(v.lock)["fl2"]
    before = served_process("fl2")
    began = time.monotonic()
    watch = Downtime("fl2")
    run = playbook("site.yml", "-l", "fl2", *v.extra_vars(), lock=v.lock)
    down = watch.stop()
    assert run.rc == 0, run.failures()
    assert_serving(["fl2"], STATE["G2"])
    assert_restarted_into("fl2", g2, before, began, watch)
    FIGURES["switch downtime of fl2 (G0 -> G2 by site.yml), s"] = down
    FIGURES["rollout of fl2 to a pin its site's mirror already holds (warm mirror), s"] = round(run.wall_s, 1)


def test_a_pin_that_breaks_start_up_stops_at_the_canary_which_is_rolled_back(scratch: Path) -> None:
    v = variant(scratch, "broken", lambda d: edit_json(d / "config.json", hidden_size=256))
    broken = planned(v.lock)
    v2: Variant = STATE["v2"]
    g2 = plans(v2.lock)["fl1"]
    before = served_process("fl1")
    began = time.monotonic()
    watch = Downtime("fl1")
    run = playbook("site.yml", *v.extra_vars(), lock=v.lock)
    down = watch.stop()
    assert run.rc != 0, run.failures()
    assert "is not healthy" in run.output and f"Rolled back to generation {STATE['G2']['fl1']}" in run.output, run.failures()
    assert "Lines that name an error" in run.output, run.failures()  # the journal excerpt
    assert_serving(HOSTS, STATE["G2"])
    assert history("fl1")[-1]["reason"].startswith("automatic: switch")
    assert machine_path("fl1", f"{ROOT}/generations/{broken['fl1']}/failed.json").is_file()
    for host in ("fl2", "fl3", "fl4"):  # never reached: nothing of the new pin on them
        assert broken[host] not in generations(host)
        assert not machine_path(host, v.store_path()).exists()
        assert run.host_summary(host)["status"] == "not reached"
    canary = run.host_summary("fl1")
    assert canary["rolled_back"] and canary["rolled_back_to"] == STATE["G2"]["fl1"] and canary["status"] == "failed"
    # The rollback itself restarted G2: systemd's Restart=always would also bring the crashed instance
    # back into whatever `current` points to, but counts that start in NRestarts (the switch and
    # the rollback reset the count before their own restart).
    after = assert_restarted_into("fl1", g2, before, began, watch)
    assert after.restarts == 0, (
        f"fl1 serves G2 from a start systemd made on its own after an exit (NRestarts {after.restarts}), "
        "not from the rollback's restart"
    )
    rc, doc = drift("--lock", str(v2.lock), "-l", "fl1")
    assert rc == 0 and not doc["hosts"]["fl1"]["drift"], doc["hosts"]["fl1"]
    FIGURES["broken pin: canary fl1 down, from the switch until rolled back and healthy, s"] = down
    FIGURES["broken pin: the whole run (stopped after the canary), s"] = round(run.wall_s, 1)


def test_a_verify_miss_in_a_later_batch_rolls_that_host_back_and_stops_the_rollout(scratch: Path) -> None:
    inventory = scratch / "inventory-fl3-unreachable-target"
    shutil.copytree(INVENTORY, inventory)  # symlinks followed: the copy stands alone
    host_vars = inventory / "host_vars" / "fl3.yml"
    doc = yaml.safe_load(host_vars.read_text())
    doc["llmfleet_instances"][0]["targets"]["min_output_tokens_per_s"] = 1_000_000
    host_vars.write_text(yaml.safe_dump(doc))
    v: Variant = STATE["v2"]
    target_gen = planned(v.lock, inventory)["fl3"]
    argv = ["-i", str(inventory), *v.extra_vars(), "-e", '{"rollout_batches": [1, 1, 1, 1]}']
    run = playbook("site.yml", *argv, lock=v.lock)
    assert run.rc != 0, run.failures()
    assert "output_tokens_per_s: measured" in run.output and "Rolled back to generation" in run.output, run.failures()
    assert_serving(HOSTS, STATE["G2"])
    assert machine_path("fl3", f"{ROOT}/generations/{target_gen}/failed.json").is_file()
    assert "[fl4]" not in run.output.split("PLAY [Rollout", 1)[1]  # its batch never started
    assert run.host_summary("fl3")["rolled_back"] and run.host_summary("fl3")["verify"] == "failed"
    assert run.host_summary("fl4")["status"] == "not reached"


def test_an_unreachable_host_is_counted_and_the_rest_of_the_fleet_stays_consistent() -> None:
    rule = ["OUTPUT", "-d", "10.213.2.24", "-p", "tcp", "--dport", "22", "-j", "REJECT", "--reject-with", "tcp-reset",
            "-m", "comment", "--comment", "llmfleet-test-unreachable"]
    subprocess.run(["iptables", "-w", "-I", *rule], check=True)
    try:
        run = playbook("site.yml")  # back to the lock's pin: a change for every host
    finally:
        subprocess.run(["iptables", "-w", "-D", *rule], check=True)
    assert run.rc != 0, run.failures()
    assert "fl4 is unreachable when its batch starts" in run.output, run.failures()
    assert_serving(["fl1", "fl2"], STATE["G0"])
    assert_serving(["fl3", "fl4"], STATE["G2"])  # fl3 shared fl4's batch: stopped before it switched
    assert run.host_summary("fl4")["status"] == "unreachable"
    assert not run.host_summary("fl3").get("switched")
    rc, doc = drift()
    assert rc == 3
    assert {h for h, v in doc["hosts"].items() if v["drift"]} == {"fl3", "fl4"}
    assert doc["hosts"]["fl3"]["generation"] == {"planned": STATE["G0"]["fl3"], "running": STATE["G2"]["fl3"]}


def test_a_site_without_a_wan_deploys_from_an_imported_bundle(scratch: Path) -> None:
    v = variant(scratch, "r6", lambda d: edit_json(d / "generation_config.json", top_k=6))
    bundle = scratch / "site-b.tar"
    argv = [sys.executable, str(REPO / "tools" / "pin.py"), "bundle", "export", "-i", str(INVENTORY), "--limit", "site-b",
            "-o", str(bundle), "--root", str(CACHE), "--root", str(scratch)]
    exports = []
    for _ in range(2):
        started = time.monotonic()
        done = subprocess.run(argv, cwd=REPO, env=env(LLMFLEET_LOCK=str(v.lock)), capture_output=True, text=True, check=False)
        exports.append((time.monotonic() - started, bundle.read_bytes() if done.returncode == 0 else b""))
        assert done.returncode == 0, done.stdout + done.stderr
    assert exports[0][1] == exports[1][1], "the same inputs gave another bundle"
    # the site's link to the control node is cut: only ssh (the operator's session) still crosses it
    cut = ["INPUT", "-i", "llmf2", "-p", "tcp", "--dport", "8091", "-j", "REJECT", "--reject-with", "tcp-reset",
           "-m", "comment", "--comment", "llmfleet-test-wan-cut"]
    subprocess.run(["iptables", "-w", "-I", *cut], check=True)
    try:
        started = time.monotonic()
        imported = subprocess.run(
            [sys.executable, str(REPO / "tools" / "pin.py"), "bundle", "import", str(bundle), "--into",
             str(machine_path("fl4", "/srv/llmfleet/mirror"))],
            cwd=REPO, env=env(), capture_output=True, text=True, check=False,
        )
        import_s = time.monotonic() - started
        assert imported.returncode == 0, imported.stdout + imported.stderr
        sites().wan.reset()
        run = playbook("site.yml", "-l", "fl4", lock=v.lock)
        wan = sites().wan.read()
    finally:
        subprocess.run(["iptables", "-w", "-D", *cut], check=True)
    assert run.rc == 0, run.failures()
    assert wan["site-b"]["upstream"] == 0
    STATE["G6"] = g6 = planned(v.lock)
    assert_serving(["fl4"], g6["fl4"])
    assert served_root("fl4") == v.store_path()
    FIGURES["bundle for site-b (runtime wheels + model), bytes"] = bundle.stat().st_size
    FIGURES["bundle export, s (twice, same bytes)"] = [round(t, 1) for t, _ in exports]
    FIGURES["bundle import into fl4's mirror, s"] = round(import_s, 1)
    FIGURES["rollout of fl4 with its WAN cut (from the imported bundle), s"] = round(run.wall_s, 1)


def test_a_mirror_down_mid_rollout_fails_its_sites_hosts_and_the_other_site_goes_on(scratch: Path) -> None:
    v = variant(scratch, "r7", lambda d: edit_json(d / "generation_config.json", top_k=8))
    ssh(MIRRORS["site-a"], "systemctl stop nginx")
    try:
        run = playbook("site.yml", "-l", "fl2,fl3,fl4", "-e", '{"rollout_batches": ["100%"], "rollout_max_fail_percentage": 70}',
                       lock=v.lock)
    finally:
        ssh(MIRRORS["site-a"], "systemctl start nginx")
    assert run.rc != 0, run.failures()
    g7 = planned(v.lock)
    for host in ("fl2", "fl3"):
        assert run.host_summary(host)["status"] == "failed"
        assert not machine_path(host, v.store_path()).exists()
    assert "http://10.213.1.21:8090/sha256/" in run.output and "Connection refused" in run.output, run.failures()
    assert_serving(["fl2"], STATE["G0"]["fl2"])
    assert_serving(["fl3"], STATE["G2"]["fl3"])
    assert run.host_summary("fl4")["switched"] and run.host_summary("fl4")["verify"] == "passed"
    assert_serving(["fl4"], g7["fl4"])


def test_a_blob_rotten_in_the_mirror_is_refused_by_the_host_and_named_by_drift(scratch: Path) -> None:
    v = variant(scratch, "r8", lambda d: (d / "extra.bin").write_bytes(os.urandom(1 << 20)))
    run = playbook("playbooks/mirrors.yml", "-l", "fl1", lock=v.lock)
    assert run.rc == 0, run.failures()
    sha = sha256_file(v.files["extra.bin"])
    blob = machine_path("fl1", f"/srv/llmfleet/mirror/sha256/{sha}")
    with blob.open("r+b") as f:
        f.seek(100)
        f.write(b"rot")
    run = playbook("site.yml", "-l", "fl2", lock=v.lock)
    assert run.rc != 0, run.failures()
    assert f"/sha256/{sha}: sha256" in run.output and f"!= pinned {sha}" in run.output, run.failures()
    assert not machine_path("fl2", v.store_path()).exists()
    assert_serving(["fl2"], STATE["G0"]["fl2"])
    rc, doc = drift("-l", "fl1")
    assert rc == 3
    assert next(d for d in doc["hosts"]["fl1"]["drift"] if d["what"] == "mirror-blob-corrupt")["expected"] == sha
    blob.unlink()  # what an operator does; the next mirrors stage fetches it again


def test_gc_keeps_the_last_generations_and_what_they_need_and_each_still_switches(scratch: Path) -> None:
    before = generations("fl1")
    v: Variant = STATE["v2"]
    keep = {STATE["G0"]["fl1"], STATE["G2"]["fl1"]}
    store_before = {p.name for p in machine_path("fl1", f"{ROOT}/store").iterdir()}
    mirror = machine_path(MIRRORS["site-a"], "/srv/llmfleet/mirror/sha256")
    held_before = {p.name for p in mirror.iterdir()}
    run = playbook("playbooks/gc.yml", "-l", "fl1", "-e", "gc_keep=2")
    assert run.rc == 0, run.failures()
    # fl2 and fl3 were left out: the mirror of their site may not be collected on fl1's word alone
    assert {p.name for p in mirror.iterdir()} == held_before
    assert "mirror of site site-a not collected: no kept generations from fl2, fl3 in this run" in " ".join(run.output.split())
    assert generations("fl1") == keep
    assert STATE["G4"]["fl1"] in before - keep
    store_after = {p.name for p in machine_path("fl1", f"{ROOT}/store").iterdir()}
    needed = set()
    for gid in keep:
        manifest = json.loads(machine_path("fl1", f"{ROOT}/generations/{gid}/manifest.json").read_text())
        needed |= {os.path.basename(e["path"]) for e in manifest["store_paths"]}
    assert store_after == needed and store_after < store_before
    for gid in (STATE["G2"]["fl1"], STATE["G0"]["fl1"]):
        run = playbook("playbooks/rollback.yml", "-l", "fl1", "-e", f"rollback_to={gid}")
        assert run.rc == 0, run.failures()
        assert_serving(["fl1"], gid)
    assert served_root("fl1") != v.store_path()
    assert ssh("fl1", "ls /var/lib/llmfleet/store | wc -l").strip() == str(len(needed))
    assert health("fl1") == 200

    # the site's mirror keeps what some kept generation of some host of the site pins, nothing else
    # (fl1's G4, dropped above, was the only generation of the site with r4's padding.bin)
    run = playbook("playbooks/gc.yml", "-e", "gc_keep=2")
    assert run.rc == 0, run.failures()
    kept: set[str] = set()
    for host in SITE_HOSTS["site-a"]:
        for gid in generations(host):
            plan = json.loads(machine_path(host, f"{ROOT}/generations/{gid}/plan.json").read_text())
            kept |= {f["sha256"] for m in plan["models"].values() for f in m["files"]}
            kept |= set(re.findall(r"--hash=sha256:([0-9a-f]{64})", plan["runtime"]["requirements"]))
    held_after = {p.name for p in mirror.iterdir()}
    assert held_after == kept & held_before and held_after < held_before
    FIGURES["gc of site-a's mirror: blobs before / after"] = f"{len(held_before)} / {len(held_after)}"
