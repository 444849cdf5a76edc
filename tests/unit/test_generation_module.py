"""The generations modules (library/llmfleet_generation.py, which changes them, and
llmfleet_generation_info.py, which reads them) on host-like trees."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from by_path import load_file

REPO = Path(__file__).resolve().parents[2]
gen = load_file("llmfleet_generation", REPO / "library" / "llmfleet_generation.py")
info = load_file("llmfleet_generation_info", REPO / "library" / "llmfleet_generation_info.py")

A, B, C, D = "a" * 24, "b" * 24, "c" * 24, "d" * 24


def params(root: Path, action: str, **kw: Any) -> dict[str, Any]:
    base = {"action": action, "root": str(root), "generation": None, "reason": "rollout", "keep": 3, "store_dir": None}
    return {**base, **kw}


def store_path(root: Path, name: str) -> Path:
    path = root / "store" / name
    path.mkdir(parents=True)
    (path / ".llmfleet-complete").write_text(json.dumps({"name": name}))
    (path / "weights").write_text(name)
    path.chmod(0o555)  # store paths are read-only trees
    return path


def render(root: Path, gid: str, runtime: Path | str, models: list[Path], unit: str = "[Service]\n") -> None:
    d = root / "generations" / gid
    (d / "instances" / "tiny").mkdir(parents=True)
    (d / "units").mkdir()
    (d / "plan.json").write_text(json.dumps({"generation": gid}))
    (d / "units" / "llmfleet-vllm@.service").write_text(unit)
    (d / "instances" / "tiny" / "env").write_text("A='1'\n")
    out = gen.run(
        params(root, "seal", generation=gid, host="h", instances={"tiny": "0" * 32},
               runtime_store_path=str(runtime), model_store_paths=[str(m) for m in models]),
        check=False,
    )
    assert out["changed"]


@pytest.fixture
def host(tmp_path: Path) -> Path:
    root = tmp_path / "llmfleet"
    rt1, rt2 = store_path(root, "r1-vllm"), store_path(root, "r2-vllm")
    m1, m2 = store_path(root, "m1-tiny"), store_path(root, "m2-tiny")
    store_path(root, "orphan-model")
    render(root, A, rt1, [m1])
    render(root, B, rt1, [m2])
    render(root, C, rt2, [m2])
    render(root, D, rt2, [m2], unit="[Service]\nX=1\n")
    # gc keeps what arrived after the last switch (a rollout in progress); file times have the
    # kernel's coarse clock (a few ms): the switches a test makes come strictly after this tree
    time.sleep(0.05)
    return root


def switch(host: Path, gid: str, reason: str = "rollout") -> dict[str, Any]:
    return gen.run(params(host, "switch", generation=gid, reason=reason), check=False)


def test_seal_hashes_every_file_and_store_marker(host: Path) -> None:
    manifest = json.loads((host / "generations" / A / "manifest.json").read_text())
    assert set(manifest["files"]) == {"plan.json", "units/llmfleet-vllm@.service", "instances/tiny/env"}
    assert manifest["files"]["instances/tiny/env"] == gen.layout.sha256_file(str(host / "generations" / A / "instances/tiny/env"))
    assert [(e["kind"], os.path.basename(e["path"])) for e in manifest["store_paths"]] == [("model", "m1-tiny"), ("runtime", "r1-vllm")]
    # same inputs, same manifest: sealing again changes nothing
    again = gen.run(params(host, "seal", generation=A, host="h", instances={"tiny": "0" * 32},
                           runtime_store_path=str(host / "store/r1-vllm"), model_store_paths=[str(host / "store/m1-tiny")]), False)
    assert not again["changed"]


def test_seal_refuses_an_incomplete_store_path(host: Path, tmp_path: Path) -> None:
    partial = tmp_path / "half"
    partial.mkdir()
    with pytest.raises(gen.GenerationError, match="not complete"):
        gen.run(params(host, "seal", generation=A, runtime_store_path=str(partial)), False)


def test_switch_is_atomic_numbered_and_idempotent(host: Path) -> None:
    first = switch(host, A)
    assert first["changed"] and first["previous"] is None and first["number"] == 1
    assert os.readlink(host / "current") == f"generations/{A}"
    second = switch(host, B)
    assert second["previous"] == A and second["number"] == 2
    assert not switch(host, B)["changed"]
    history = json.loads((host / "history.json").read_text())["entries"]
    assert [(e["n"], e["generation"], e["from"]) for e in history] == [(1, A, None), (2, B, A)]
    assert not list(host.glob(".current.*"))


def test_switch_refuses_an_unsealed_generation(host: Path) -> None:
    (host / "generations" / A / "manifest.json").unlink()
    with pytest.raises(gen.GenerationError, match="not complete"):
        switch(host, A)
    assert not (host / "current").exists()


def test_check_mode_switch_changes_nothing(host: Path) -> None:
    switch(host, A)
    out = gen.run(params(host, "switch", generation=B), check=True)
    assert out["changed"] and os.readlink(host / "current") == f"generations/{A}"


def test_previous_skips_failed_generations(host: Path) -> None:
    for g in (A, B, C):
        switch(host, g)
    gen.run(params(host, "mark", generation=B, verdict="failed", reason="verify"), False)
    status = info.run({"root": str(host), "to": "previous"})
    assert status["current"] == C and status["target"] == A
    assert {g["id"]: g["failed"] for g in status["generations"]}[B]


def test_rollback_target_by_number_and_by_id_prefix(host: Path) -> None:
    for g in (A, B, C):
        switch(host, g)
    assert info.run({"root": str(host), "to": "1"})["target"] == A
    assert info.run({"root": str(host), "to": B[:8]})["target"] == B
    with pytest.raises(gen.GenerationError, match=r"no switch numbered 9 .*valid: 1, 2, 3"):
        info.run({"root": str(host), "to": "9"})
    with pytest.raises(gen.GenerationError, match="no generation matches"):
        info.run({"root": str(host), "to": "e" * 8})


def test_no_previous_on_a_first_rollout(host: Path) -> None:
    switch(host, A)
    with pytest.raises(gen.GenerationError, match="no previous generation"):
        info.run({"root": str(host), "to": "previous"})


def test_mark_keeps_one_verdict(host: Path) -> None:
    gen.run(params(host, "mark", generation=A, verdict="failed", reason="x"), False)
    gen.run(params(host, "mark", generation=A, verdict="verified", detail={"ok": True}), False)
    assert (host / "generations" / A / "verified.json").exists()
    assert not (host / "generations" / A / "failed.json").exists()


def test_gc_keeps_the_last_k_and_every_path_they_need(host: Path) -> None:
    for g in (A, B, C, D):
        switch(host, g)
    plan = gen.run(params(host, "gc", keep=2), check=True)
    assert plan["kept_generations"] == [D, C]
    assert sorted(plan["removed_generations"]) == [A, B]
    assert sorted(os.path.basename(p) for p in plan["removed_store_paths"]) == ["m1-tiny", "orphan-model", "r1-vllm"]
    assert (host / "generations" / A).exists()  # check mode removed nothing
    gen.run(params(host, "gc", keep=2), check=False)
    assert sorted(p.name for p in (host / "generations").iterdir()) == sorted([C, D])
    assert sorted(p.name for p in (host / "store").iterdir()) == ["m2-tiny", "r2-vllm"]
    # every kept generation can still be switched to
    assert switch(host, C)["changed"] and switch(host, D)["changed"]
    assert not gen.run(params(host, "gc", keep=2), check=False)["changed"]


def test_gc_never_guesses_when_a_kept_manifest_is_unreadable(host: Path) -> None:
    for g in (A, B):
        switch(host, g)
    (host / "generations" / A / "manifest.json").write_text("{not json")
    with pytest.raises(gen.GenerationError, match="not readable JSON"):
        gen.run(params(host, "gc", keep=2), False)
    assert (host / "store" / "orphan-model").exists()


@pytest.mark.parametrize("keep", [0, -1])
def test_gc_refuses_keep_below_one(host: Path, keep: int) -> None:
    with pytest.raises(gen.GenerationError, match=r"keep = .*expected a whole number >= 1"):
        gen.run(params(host, "gc", keep=keep), False)


def test_bad_generation_id_is_named(host: Path) -> None:
    with pytest.raises(gen.GenerationError, match=r"generation '\.\./etc' is not a generation id"):
        switch(host, "../etc")


def test_gc_names_the_blobs_its_kept_generations_pin_for_the_sites_mirror(host: Path) -> None:
    for g in (A, B, C):
        switch(host, g)
    shas = {g: (f"{i:x}" * 64)[:64] for i, g in enumerate((A, B, C), start=10)}
    for g, model_sha in shas.items():
        wheel = model_sha[::-1]
        plan = {"generation": g, "models": {"m": {"files": [{"path": "w", "sha256": model_sha, "size": 1}]}},
                "runtime": {"requirements": f"fake==1 --hash=sha256:{wheel}\n"}}
        (host / "generations" / g / "plan.json").write_text(json.dumps(plan))
    kept = gen.run(params(host, "gc", keep=2), check=True)
    assert kept["kept_generations"] == [C, B]
    assert kept["kept_blobs"] == sorted({shas[C], shas[C][::-1], shas[B], shas[B][::-1]})


# --- gc against a root spelled another way, work in progress, and a concurrent gc -----------------


def test_gc_compares_real_paths_not_spellings(host: Path) -> None:
    """A root spelled /var/lib/./llmfleet (here <tmp>/./llmfleet) must not make gc take the live
    runtime and model for unreferenced paths."""
    switch(host, A)
    spelled = f"{host.parent}/./{host.name}"  # a string: pathlib would normalise it
    out = gen.run({**params(host, "gc", keep=1), "root": spelled}, check=False)
    assert (host / "store" / "r1-vllm").exists() and (host / "store" / "m1-tiny").exists(), out
    assert sorted(os.path.basename(p) for p in out["removed_store_paths"]) == ["m2-tiny", "orphan-model", "r2-vllm"]


def test_gc_compares_real_paths_of_the_manifests_too(host: Path, tmp_path: Path) -> None:
    rt = store_path(host, "r3-vllm")
    spelled_rt = f"{host.parent}/./{host.name}/store/{rt.name}"  # as an old manifest may record it
    render(host, "e" * 24, spelled_rt, [host / "store" / "m1-tiny"])
    switch(host, "e" * 24)
    gen.run(params(host, "gc", keep=1), check=False)
    assert rt.exists() and (host / "store" / "m1-tiny").exists()


def test_gc_never_touches_a_partial_build(host: Path) -> None:
    switch(host, A)
    partial = host / "store" / "x-vllm-cpu.partial"
    partial.mkdir()
    (partial / "half-written").write_text("x")
    gen.run(params(host, "gc", keep=1), check=False)
    assert partial.exists()


def test_gc_never_touches_a_generation_or_store_path_newer_than_current(host: Path) -> None:
    """A rollout renders its generation and builds its store paths before it switches: gc between
    the two must leave them alone (rendered after the last switch = newer than current)."""
    switch(host, A)
    time_after_switch = os.lstat(host / "current").st_mtime_ns
    time.sleep(0.05)
    fresh = store_path(host, "r9-vllm")  # built by the running rollout, not sealed into anything yet
    render(host, "f" * 24, fresh, [host / "store" / "m2-tiny"])
    unsealed = host / "generations" / ("9" * 24)
    unsealed.mkdir()  # still being rendered
    assert os.lstat(fresh).st_ctime_ns >= time_after_switch
    out = gen.run(params(host, "gc", keep=1), check=False)
    assert (host / "generations" / ("f" * 24)).exists() and unsealed.exists(), out
    assert fresh.exists() and (host / "store" / "m2-tiny").exists(), out
    assert sorted(out["removed_generations"]) == [B, C, D]


def test_gc_takes_a_lock_and_waits_for_no_one_forever(host: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fcntl

    switch(host, A)
    monkeypatch.setitem(gen.Root.locked.__wrapped__.__globals__, "LOCK_WAIT_S", 0.3)  # the layout's owner reads it
    with open(host / ".lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another gc (or a switch) is running
        with pytest.raises(gen.GenerationError, match=r"another llmfleet_generation action holds .*\.lock"):
            gen.run(params(host, "gc", keep=1), check=False)
        with pytest.raises(gen.GenerationError, match="another llmfleet_generation action"):
            switch(host, B)
    assert (host / "store" / "orphan-model").exists() and os.readlink(host / "current") == f"generations/{A}"
    assert gen.run(params(host, "gc", keep=1), check=False)["changed"]  # released: it runs


# --- keys belong to the generations that use them; verdicts and switches ------------------------


def _keyed_generation(root: Path, gid: str, keyed: list[str], runtime: Path, key_dir: Path) -> None:
    render(root, gid, runtime, [])
    plan = {"generation": gid, "instances": [
        {"name": n, "api_key_required": n in keyed, "api_key_file": str(key_dir / f"{n}.env") if n in keyed else None}
        for n in ("x", "y")
    ]}  # fmt: skip
    (root / "generations" / gid / "plan.json").write_text(json.dumps(plan))
    gen.run(params(root, "seal", generation=gid, host="h", instances={}, runtime_store_path=str(runtime), model_store_paths=[]), False)


def test_gc_removes_a_key_file_only_with_the_last_generation_that_needs_it(tmp_path: Path) -> None:
    """A generation that un-exposes x and fails its switch rolls back to one that needs x's key:
    the key stays while any kept generation needs it, and goes with the last one."""
    root = tmp_path / "llmfleet"
    keys = tmp_path / "api-keys"
    keys.mkdir()
    rt = store_path(root, "r1-vllm")
    _keyed_generation(root, A, ["x"], rt, keys)  # x exposed
    _keyed_generation(root, B, [], rt, keys)  # x un-exposed
    for n in ("x", "stray"):
        (keys / f"{n}.env").write_text("VLLM_API_KEY=k\n")
    time.sleep(0.05)
    switch(host=root, gid=A)
    switch(host=root, gid=B)
    gen.run(params(root, "gc", keep=2, api_key_dir=str(keys)), check=False)
    assert (keys / "x.env").exists(), "A is kept and needs x's key"
    assert not (keys / "stray.env").exists(), "no kept generation names it"
    time.sleep(0.05)
    switch(host=root, gid=B)
    out = gen.run(params(root, "gc", keep=1, api_key_dir=str(keys)), check=False)
    assert not (keys / "x.env").exists() and out["removed_api_key_files"] == [str(keys / "x.env")]


def test_a_failed_verdict_is_readable_by_root_only(host: Path) -> None:
    gen.run(params(host, "mark", generation=A, verdict="failed", reason="x", detail={"journal": "Traceback ... prompt text"}), False)
    assert (host / "generations" / A / "failed.json").stat().st_mode & 0o777 == 0o600
    gen.run(params(host, "mark", generation=B, verdict="verified", detail={"ok": True}), False)
    assert (host / "generations" / B / "verified.json").stat().st_mode & 0o077 == 0o044


def test_an_old_world_readable_failed_verdict_is_made_root_only(host: Path) -> None:
    doc = {"schema": 1, "verdict": "failed", "reason": "x", "detail": None}
    path = host / "generations" / A / "failed.json"
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    path.chmod(0o644)
    gen.run(params(host, "mark", generation=A, verdict="failed", reason="x"), False)
    assert path.stat().st_mode & 0o777 == 0o600


def test_switch_refuses_a_generation_whose_store_path_changed(host: Path) -> None:
    marker = host / "store" / "r1-vllm" / ".llmfleet-complete"
    (host / "store" / "r1-vllm").chmod(0o755)
    marker.write_text("another runtime")
    with pytest.raises(gen.GenerationError, match=r"store path .*r1-vllm.* is not the one generation .* was sealed with"):
        switch(host, A)
    marker.unlink()
    with pytest.raises(gen.GenerationError, match=r"store path .*r1-vllm.* is not complete"):
        switch(host, A)
    assert not (host / "current").exists()


def test_switch_refuses_a_generation_whose_files_changed(host: Path) -> None:
    (host / "generations" / A / "instances" / "tiny" / "env").write_text("A='2'\n")
    with pytest.raises(gen.GenerationError, match=r"instances/tiny/env .*differs from its manifest"):
        switch(host, A)


# --- decide: what a switch restarts and stops ---------------------------------------------------


def _instances(**hashes: str) -> list[dict[str, str]]:
    return [{"name": n, "content_hash": h, "unit": f"llmfleet-vllm@{n}.service"} for n, h in hashes.items()]


def _with_plan_instances(root: Path, gid: str, instances: list[dict[str, str]]) -> None:
    """Give the generation's plan its instances (as the role renders them), sealed again."""
    (root / "generations" / gid / "plan.json").write_text(json.dumps({"generation": gid, "instances": instances}))
    (root / "generations" / gid / "manifest.json").unlink()
    gen.run(params(root, "seal", generation=gid, host="h", instances={i["name"]: i["content_hash"] for i in instances},
                   runtime_store_path=str(root / "store/r1-vllm"), model_store_paths=[str(root / "store/m1-tiny")]), False)  # fmt: skip


def decide(root: Path, new: list[dict[str, str]], **kw: Any) -> dict[str, Any]:
    return gen.run(params(root, "decide", generation=B, plan_instances=new, **kw), check=False)


def test_decide_restarts_changed_and_new_instances_and_stops_the_gone(host: Path) -> None:
    _with_plan_instances(host, A, _instances(tiny="1" * 32, old="2" * 32, same="3" * 32))
    switch(host, A)
    out = decide(host, _instances(same="3" * 32, tiny="9" * 32, fresh="4" * 32))
    assert out["restart"] == ["tiny", "fresh"] and out["gone"] == ["llmfleet-vllm@old.service"] and not out["changed"]
    # the same plan: nothing; a unit systemd still knows that no plan has: stopped
    # (the template unit itself, which systemd lists too, is no instance)
    known = ["llmfleet-vllm@stray.service", "llmfleet-vllm@.service", "ssh.service", "llmfleet-store-check.service"]
    out = decide(host, _instances(tiny="1" * 32, old="2" * 32, same="3" * 32), known_units=known)
    assert out["restart"] == [] and out["gone"] == ["llmfleet-vllm@stray.service"]


def test_decide_restarts_what_a_failed_run_left_pending_and_a_changed_key(host: Path) -> None:
    _with_plan_instances(host, A, _instances(tiny="1" * 32, same="3" * 32))
    switch(host, A)
    (host / "pending-restart.json").write_text('["same", "removed-since"]\n')
    out = decide(host, _instances(tiny="1" * 32, same="3" * 32))
    assert out["restart"] == ["same"], "only instances of the new plan restart"
    (host / "pending-restart.json").unlink()
    assert decide(host, _instances(tiny="1" * 32, same="3" * 32), restart_also=["tiny"])["restart"] == ["tiny"]
    (host / "pending-restart.json").write_text('{"not": "a list"}')
    with pytest.raises(gen.GenerationError, match="is not a list of instance names"):
        decide(host, _instances(tiny="1" * 32))


def test_decide_on_a_fresh_host_starts_everything_and_refuses_an_incomplete_instance(tmp_path: Path) -> None:
    root = tmp_path / "llmfleet"
    out = decide(root, _instances(a="1" * 32, b="2" * 32))
    assert out["restart"] == ["a", "b"] and out["gone"] == [] and out["current"] is None
    with pytest.raises(gen.GenerationError, match="each needs name, content_hash and unit"):
        decide(root, [{"name": "a"}])


def test_info_reads_without_changing_anything(host: Path) -> None:
    for g in (A, B):
        switch(host, g)

    def tree() -> dict[str, tuple[int, int]]:
        return {str(p): (p.lstat().st_mtime_ns, p.lstat().st_size) for p in sorted(host.rglob("*"))}

    before = tree()
    out = info.run({"root": str(host), "to": None})
    assert out["changed"] is False and "target" not in out
    assert out["current"] == B and out["previous"] == A and [e["generation"] for e in out["history"]] == [A, B]
    assert tree() == before
