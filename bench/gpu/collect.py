#!/usr/bin/env python3
"""Turn what run_captures.py wrote on the GPU machine into the committed fixtures.

    python3 bench/gpu/collect.py --results DIR --manifest MANIFEST --models MODELS --out tests/fixtures/gpu/captures

One JSON per capture that came up healthy: the checkpoint's config.json, the planner's facts,
the plan's argv and the argv that ran, vLLM's memory log lines, ``vllm:cache_config_info`` (the raw
line and its labels) and the worker's own figures in bytes (memhook). Captures that failed are
listed with their last log lines in ``failed.json``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

LABEL = re.compile(r'(\w+)="([^"]*)"')


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", required=True)
    p.add_argument("--manifest", required=True)
    p.add_argument("--models", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    manifest = json.loads(Path(args.manifest).read_text())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failed = {}
    for cap in manifest["captures"]:
        d = Path(args.results) / cap["id"].replace("@", "-")
        if not (d / "result.json").exists():
            continue
        r = json.loads((d / "result.json").read_text())
        if not r.get("healthy"):
            failed[cap["id"]] = {"argv_run": r["argv_run"], "last_lines": r["memory_log_lines"][-8:]}
            continue
        info = r["cache_config_info"][0]
        worker = next(iter(r["memhook"].values()))
        fixture = {
            "id": cap["id"],
            "budget": cap["budget"],
            "model": cap["model"],
            "hardware": manifest["hardware"],
            "facts": cap["facts"],
            "quantization": cap["quantization"],
            "gpu_memory_utilization": cap["gpu_memory_utilization"],
            "engine_args": cap["engine_args"],
            "config_json": json.loads((Path(args.models) / cap["model"] / "config.json").read_text()),
            "argv_plan": cap["argv"],
            "argv_run": r["argv_run"],
            "environment_plan": cap["environment"],
            "started": r["started"],
            "cache_config_info": {"line": info, "labels": dict(LABEL.findall(info))},
            "worker": worker["determine_available_memory"],
            "after_warmup": worker.get("compile_or_warm_up_model"),
            "memory_log_lines": [ln for ln in r["memory_log_lines"] if not ln.rstrip().endswith("OK")],
            "gpu_used_mib_serving": r.get("gpu_used_mib_serving"),
        }
        if "agreement" in r:
            fixture["agreement"] = r["agreement"]
            fixture["verify_plan"] = r.get("verify_plan")
        (out / f"{cap['id'].replace('@', '-')}.json").write_text(json.dumps(fixture, indent=1, sort_keys=True) + "\n")
        print(f"{cap['id']}: num_gpu_blocks {fixture['cache_config_info']['labels']['num_gpu_blocks']}")
    for name in sorted(failed):
        print(f"{name}: failed")
    (out / "failed.json").write_text(json.dumps(failed, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
