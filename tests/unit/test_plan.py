"""The evaluator: valid specs give complete plans; each invalid case is refused by name."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from llmfleet.errors import PlanRefused
from llmfleet.pins import load_lock
from llmfleet.plan import evaluate_host

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
LOCK = load_lock(FIXTURES / "lock.json")


def lab_vars(**instance_overrides: Any) -> dict[str, Any]:
    inst = {
        "name": "tiny",
        "model": "tiny-llama",
        "gpus": [0],
        "tensor_parallel": 1,
        "pipeline_parallel": 1,
        "port": 8000,
        "max_model_len": 2048,
        "kv_cache_memory_bytes": 1 << 28,
        "engine_args": {"enforce_eager": True},
        "targets": {"min_output_tokens_per_s": 10, "min_context_tokens": 2048},
    }
    inst.update(instance_overrides)
    return {
        "llmfleet_hardware": "lab-cpu",
        "llmfleet_runtime": "vllm-cpu-0.32.0",
        "llmfleet_instances": [inst],
        "ansible_host": "10.0.0.1",  # other variables are ignored
    }


def refusal(host_vars: dict[str, Any]) -> str:
    with pytest.raises(PlanRefused) as info:
        evaluate_host("h1", host_vars, LOCK)
    return str(info.value)


def test_valid_plan_has_everything_a_role_needs() -> None:
    plan = evaluate_host("lab1", lab_vars(), LOCK)
    inst = plan["instances"][0]
    assert plan["schema"] == 1 and plan["host"] == "lab1"
    assert plan["runtime"]["store_path"].startswith("/var/lib/llmfleet/store/")
    assert plan["runtime"]["store_path"].endswith("-vllm-cpu-0.32.0")
    assert "--hash=sha256:" in plan["runtime"]["requirements"]
    model_path = plan["models"]["tiny-llama"]["store_path"]
    assert inst["argv"][:3] == [plan["runtime"]["store_path"] + "/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    argv = inst["argv"]
    assert argv[argv.index("--model") + 1] == model_path
    assert argv[argv.index("--port") + 1] == "8000"
    assert argv[argv.index("--kv-cache-memory-bytes") + 1] == str(1 << 28)
    assert "--enforce-eager" in argv
    assert inst["environment"]["VLLM_CPU_OMP_THREADS_BIND"] == "0"
    assert inst["environment"]["HF_HUB_OFFLINE"] == "1"
    assert inst["url"] == "http://127.0.0.1:8000"
    assert inst["unit"] == "llmfleet-vllm@tiny.service"
    assert plan["service"]["private_devices"] is True and inst["sandbox"]["device_allow"] == []
    assert inst["user"] == "llmfleet-tiny" and plan["service"]["dynamic_user"] is True
    assert plan["unresolved"] == []


def test_plan_is_a_value_same_inputs_same_generation() -> None:
    a = evaluate_host("lab1", lab_vars(), LOCK)
    b = evaluate_host("lab1", copy.deepcopy(lab_vars()), LOCK)
    assert a == b
    c = evaluate_host("lab1", lab_vars(max_model_len=1024, targets={"min_context_tokens": 1024}), LOCK)
    assert c["generation"] != a["generation"]
    assert c["instances"][0]["content_hash"] != a["instances"][0]["content_hash"]


def test_cpu_tp2_binds_both_core_groups() -> None:
    plan = evaluate_host("lab2", lab_vars(gpus=[0, 1], tensor_parallel=2), LOCK)
    inst = plan["instances"][0]
    assert inst["environment"]["VLLM_CPU_OMP_THREADS_BIND"] == "0|1"
    assert inst["argv"][inst["argv"].index("--tensor-parallel-size") + 1] == "2"


def test_cuda_profile_sets_visible_devices_and_device_allow() -> None:
    host_vars = {
        "llmfleet_hardware": "xr7620-4xl4",
        "llmfleet_runtime": "vllm-0.19.0-cu128",
        "llmfleet_instances": [
            {"name": "g", "model": "gemma-4-31b-it", "gpus": [2, 3], "tensor_parallel": 2, "port": 8000, "max_model_len": 8192}
        ],
    }
    plan = evaluate_host("edge", host_vars, LOCK)
    env = plan["instances"][0]["environment"]
    assert env["CUDA_VISIBLE_DEVICES"] == "2,3" and env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    allowed = plan["instances"][0]["sandbox"]["device_allow"]
    assert allowed == ["/dev/nvidiactl rw", "/dev/nvidia-uvm rw", "/dev/nvidia2 rw", "/dev/nvidia3 rw"]
    assert not plan["service"]["private_devices"]
    # unresolved pins are listed, not hidden: the deploy refuses them
    assert any("runtime vllm-0.19.0-cu128" in u for u in plan["unresolved"])
    assert any("model gemma-4-31b-it" in u for u in plan["unresolved"])


def test_overlapping_gpus_between_instances_refused() -> None:
    v = lab_vars()
    second = dict(v["llmfleet_instances"][0], name="other", port=8001)
    v["llmfleet_instances"].append(second)
    msg = refusal(v)
    assert "llmfleet_instances[1] (other).gpus" in msg and "device 0 is already given to instance 'tiny'" in msg


def test_tp_times_pp_must_equal_gpu_count() -> None:
    msg = refusal(lab_vars(gpus=[0, 1], tensor_parallel=1, pipeline_parallel=1))
    assert "tensor_parallel × pipeline_parallel = 1 × 1 = 1" in msg.replace('"', "")
    assert "valid: tensor_parallel × pipeline_parallel = 2" in msg


def test_gpu_index_beyond_profile_refused() -> None:
    msg = refusal(lab_vars(gpus=[2]))
    assert "device index 2 is beyond hardware profile 'lab-cpu' (2 devices)" in msg and "valid: indices 0-1" in msg


def test_port_clash_refused() -> None:
    v = lab_vars()
    v["llmfleet_instances"].append(dict(v["llmfleet_instances"][0], name="other", gpus=[1]))
    msg = refusal(v)
    assert "(other).port = 8000: is already used by instance 'tiny'" in msg


def test_unknown_model_refused_with_known_keys() -> None:
    msg = refusal(lab_vars(model="llama-9000"))
    assert '.model = "llama-9000": unknown model key' in msg and "gemma-4-31b-it, tiny-llama" in msg


def test_max_model_len_above_model_limit_refused() -> None:
    msg = refusal(lab_vars(max_model_len=8192, targets={}))
    assert ".max_model_len = 8192: exceeds the model's limit" in msg and "valid: at most 4096" in msg


def test_heads_not_divisible_by_tp_refused() -> None:
    v = {
        "llmfleet_hardware": "xr7620-4xl4",
        "llmfleet_runtime": "vllm-0.19.0-cu128",
        "llmfleet_instances": [
            {"name": "g", "model": "gemma-4-31b-it", "gpus": [0, 1, 2], "tensor_parallel": 3, "port": 8000, "max_model_len": 8192}
        ],
    }
    msg = refusal(v)
    assert ".tensor_parallel = 3: does not divide the 32 attention heads of gemma-4-31b-it" in msg
    assert "valid: one of [1, 2, 4, 8, 16, 32]" in msg


def test_unknown_field_and_renamed_field_refused() -> None:
    v = lab_vars()
    v["llmfleet_instances"][0]["colour"] = "blue"
    assert "llmfleet_instances.0.colour" in refusal(v) or "llmfleet_instances[0].colour" in refusal(v)
    v = lab_vars()
    v["llmfleet_instances"][0]["tp"] = 2
    msg = refusal(v)
    assert "llmfleet_instances[0].tp = 2: was renamed or removed (valid: use tensor_parallel)" in msg
    msg = refusal(dict(lab_vars(), llmfleet_modles=[]))
    assert "llmfleet_modles" in msg and "unknown field" in msg


def test_all_problems_reported_at_once() -> None:
    with pytest.raises(PlanRefused) as info:
        evaluate_host("h1", lab_vars(gpus=[5], port=8000, max_model_len=99999, targets={}), LOCK)
    wheres = {p.where for p in info.value.problems}
    assert "llmfleet_instances[0] (tiny).gpus" in wheres
    assert "llmfleet_instances[0] (tiny).max_model_len" in wheres


def test_type_errors_name_field_and_value() -> None:
    msg = refusal(lab_vars(port="eighty"))
    assert "llmfleet_instances[0].port" in msg and '"eighty"' in msg
    msg = refusal(lab_vars(port=80))
    assert "greater than or equal to 1024" in msg


def test_cpu_profile_needs_kv_cache_size_and_no_gpu_util() -> None:
    msg = refusal(lab_vars(kv_cache_memory_bytes=None, gpu_memory_utilization=0.9))
    assert "kv_cache_memory_bytes = null: the CPU build of vLLM needs a fixed KV-cache size" in msg
    assert "gpu_memory_utilization = 0.9: has no meaning on a CPU profile" in msg


def test_runtime_device_must_match_profile() -> None:
    v = lab_vars()
    v["llmfleet_runtime"] = "vllm-0.19.0-cu128"
    assert "is a cuda build but hardware profile 'lab-cpu' is cpu" in refusal(v)


def test_managed_engine_args_refused() -> None:
    msg = refusal(lab_vars(engine_args={"port": 9000, "Bad-Name": 1}))
    assert "engine_args.port = 9000: is set by llmfleet (valid: use port)" in msg
    assert "is not a vLLM flag name" in msg


def test_unknown_hardware_and_runtime_refused() -> None:
    v = lab_vars()
    v["llmfleet_hardware"] = "dgx"
    assert "llmfleet_hardware = \"dgx\": unknown hardware profile" in refusal(v)
    v = lab_vars()
    v["llmfleet_runtime"] = "vllm-9"
    assert "llmfleet_runtime = \"vllm-9\": unknown runtime key" in refusal(v)


# --- sites ---------------------------------------------------------------------------------------

SITE = {"llmfleet_site": "site-a", "llmfleet_site_mirror": {"host": "h1", "url": "http://10.213.1.21:8090", "upstream": "http://10.213.1.1:8091"}}


def test_a_site_adds_its_mirror_and_the_wheels_by_sha256_but_not_a_new_generation() -> None:
    lock = load_lock()  # the shipped lock names every wheel file with its size
    plain = evaluate_host("h1", lab_vars(), lock)
    sited = evaluate_host("h1", lab_vars() | SITE, lock)
    assert "site" not in plain
    assert sited["site"]["name"] == "site-a" and sited["site"]["mirror"] == SITE["llmfleet_site_mirror"]
    wheels = sited["site"]["wheels"]
    assert wheels and {w["sha256"] for w in wheels} == {r.sha256 for r in lock.runtimes["vllm-cpu-0.32.0"].requirements or []}
    assert all(w["filename"].endswith(".whl") and w["size"] > 0 for w in wheels)
    # how the bytes reach a host is not what it runs: no restart when a site or its mirror moves
    assert sited["generation"] == plain["generation"]
    moved = {"llmfleet_site_mirror": {**SITE["llmfleet_site_mirror"], "url": "http://10.0.0.9:80"}}
    assert evaluate_host("h1", lab_vars() | SITE | moved, lock)["generation"] == plain["generation"]
    # a runtime pinned without file names cannot come from a mirror (this fixture lock's)
    assert "pins 2 wheel(s) without file name and size (e.g. vllm-cpu)" in refusal(lab_vars() | SITE)


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ({"llmfleet_site": "Site A"}, "llmfleet_site"),
        ({"llmfleet_site_mirror": SITE["llmfleet_site_mirror"]}, "llmfleet_site_mirror is set but llmfleet_site is not"),
        ({**SITE, "llmfleet_site_mirror": {"host": "h1", "url": "ftp://x"}}, "llmfleet_site_mirror.url"),
        ({**SITE, "llmfleet_site_mirror": {"host": "h1", "url": "http://x:1", "upstream": "x"}}, "llmfleet_site_mirror.upstream"),
        ({**SITE, "llmfleet_site_mirror": {"url": "http://x:1"}}, "llmfleet_site_mirror.host"),
    ],
)
def test_a_bad_site_is_refused_by_name(extra: dict[str, Any], needle: str) -> None:
    assert needle in refusal(lab_vars() | extra)


def test_a_site_has_one_mirror_on_a_host_of_its_own() -> None:
    from llmfleet.plan import evaluate_fleet

    other = {**SITE, "llmfleet_site_mirror": {**SITE["llmfleet_site_mirror"], "url": "http://10.213.1.22:8090"}}
    lock = load_lock()
    _, problems = evaluate_fleet({"h1": lab_vars() | SITE, "h2": lab_vars() | other}, lock)
    assert [(p.host, p.message) for p in problems] == [("h1", "the hosts of site site-a name 2 different mirrors"),
                                                       ("h2", "the hosts of site site-a name 2 different mirrors")]
    away = {**SITE, "llmfleet_site_mirror": {**SITE["llmfleet_site_mirror"], "host": "h9"}}
    _, problems = evaluate_fleet({"h1": lab_vars() | away, "h2": lab_vars() | away}, lock)
    assert [(p.host, p.where, p.value, p.valid) for p in problems] == [("h1", "llmfleet_site_mirror.host", "h9", "h1, h2"),
                                                                       ("h2", "llmfleet_site_mirror.host", "h9", "h1, h2")]
    _, problems = evaluate_fleet({"h1": lab_vars() | SITE, "h2": lab_vars() | SITE}, lock)
    assert problems == []


def test_a_limit_narrows_the_report_but_a_site_is_judged_on_every_host() -> None:
    """SITE's mirror runs on h1: planning h2 alone (a --limit) must not refuse it for that."""
    from llmfleet.plan import evaluate_fleet

    lock = load_lock()
    plans, problems = evaluate_fleet({"h1": lab_vars() | SITE, "h2": lab_vars() | SITE}, lock, only=["h2"])
    assert list(plans) == ["h2"] and problems == []
    away = {**SITE, "llmfleet_site_mirror": {**SITE["llmfleet_site_mirror"], "host": "h9"}}
    plans, problems = evaluate_fleet({"h1": lab_vars() | away, "h2": lab_vars() | away}, lock, only=["h2"])
    assert list(plans) == ["h2"] and [(p.host, p.value) for p in problems] == [("h2", "h9")]


def test_the_unit_revision_is_the_instance_templates_content(tmp_path: Path) -> None:
    """Any change of the unit, drop-in, launch or env template restarts instances: no number to bump."""
    import shutil

    from llmfleet.plan import UNIT_TEMPLATES, unit_revision

    templates = tmp_path / "templates"
    shutil.copytree(Path(__file__).resolve().parents[2] / "roles" / "vllm_service" / "templates", templates)
    assert unit_revision(templates) == unit_revision()
    seen = {unit_revision()}
    for name in UNIT_TEMPLATES:
        path = templates / name
        path.write_text(path.read_text() + "# changed\n")
        unit_revision.cache_clear()
        seen.add(unit_revision(templates))
    assert len(seen) == 1 + len(UNIT_TEMPLATES)
    unit_revision.cache_clear()
    plan = evaluate_host("h1", lab_vars(), load_lock())
    assert plan["service"]["unit_revision"] == unit_revision()
