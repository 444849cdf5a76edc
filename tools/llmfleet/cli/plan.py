"""``tools/plan.py``: print the plan of an inventory's hosts, or refuse it with the reasons.

``--explain`` shows, per instance, every compatibility rule (also those that passed or did not
apply, with why) and the capacity arithmetic step by step. ``--recommend MODEL`` lists the valid
layouts of a model on a hardware profile, ranked, with the rule that dropped each invalid one.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .. import rules
from ..capacity import fmt_bytes
from ..errors import InputError, Problem
from ..inventory import load_inventory, load_inventory_limited
from ..pins import DEFAULT_LOCK, Lock, load_lock
from ..plan import evaluate_fleet, explain_host, parse_spec, resolve_hardware
from .common import ExitCode, add_limit, deprecated_limit, dump_json, run

ENVELOPE = "llmfleet.plan/1"
RECOMMEND_ENVELOPE = "llmfleet.recommend/1"
DEFAULT_RECOMMEND_LEN = 8192


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="plan.py", description="Evaluate inventory spec + pins into per-host plans.")
    p.add_argument("-i", "--inventory", help="inventory directory or hosts file, e.g. inventory/lab")
    add_limit(p, deprecated=("--host",))
    p.add_argument("--lock", help=f"pins lock file (default: $LLMFLEET_LOCK or {DEFAULT_LOCK})")
    p.add_argument("--json", action="store_true", help="print a versioned JSON envelope for machines")
    p.add_argument("--strict", action="store_true", help="also refuse unresolved pins (what a deploy does)")
    p.add_argument("--explain", action="store_true", help="every rule per instance (passed ones too) and the capacity arithmetic")
    p.add_argument("--schema", action="store_true", help="print the plan's JSON Schema (docs/plan.schema.json) and exit")
    p.add_argument("--write-schema", action="store_true",
                   help="write what the plan's schema generates (docs/plan.schema.json, docs/plan-fields.md, the roles' "
                        "nested argument specs) where it is not current, and exit")  # fmt: skip
    p.add_argument("--record-gpus", action="store_true",
                   help="measure the NVML topology of the GPU hosts (-l) and record it into the inventory "
                        "directory's llmfleet-measured.yml, which the plan then uses")  # fmt: skip
    r = p.add_argument_group("recommend", "list the valid layouts of a model, ranked")
    r.add_argument("--recommend", metavar="MODEL", help="a model key of the lock")
    r.add_argument("--hardware", help="hardware profile key (default: the inventory host's llmfleet_hardware)")
    r.add_argument("--runtime", help="runtime key of the lock (default: the inventory host's llmfleet_runtime)")
    r.add_argument("--max-model-len", type=int, help=f"context length to plan for (default {DEFAULT_RECOMMEND_LEN})")
    r.add_argument("--gpu-memory-utilization", type=float, help="default: the engine version's default")
    r.add_argument("--kv-cache-memory-bytes", type=int, help="a fixed KV cache size per worker (needed on CPU profiles)")
    return p


def escape(text: str) -> str:
    from rich.markup import escape as _escape

    return _escape(text)


def _console() -> Any:
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 160, soft_wrap=True)


COLUMNS = ("instance", "model", "devices", "tp×pp", "bind:port", "max_len", "weights/GPU", "KV tokens", "conc.", "decode ≤", "targets")


def _human(plans: dict[str, dict[str, Any]], problems: list[Problem]) -> None:
    from rich.table import Table

    console = _console()
    for host, plan in plans.items():
        table = Table(title=f"{host}  ·  generation {plan['generation']}  ·  {plan['hardware_profile']}  ·  {plan['runtime']['key']}")
        for col in COLUMNS:
            table.add_column(col)
        for inst in plan["instances"]:
            t = inst["targets"]
            targets = ", ".join(f"{k}={v}" for k, v in t.items()) or "-"
            c = inst.get("capacity") or {}
            table.add_row(
                inst["name"],
                inst["model"],
                ",".join(map(str, inst["devices"])),
                f"{inst['tensor_parallel']}×{inst['pipeline_parallel']}",
                f"{inst['bind']}:{inst['port']}",
                str(inst["max_model_len"]),
                fmt_bytes(c["weights"]["max_bytes_per_gpu"]) if c else "-",
                str(c["kv"]["tokens"]) if c else "-",
                f"{c['kv']['max_concurrency']:.2f}" if c else "-",
                f"{c['decode']['tokens_per_s_bound']:g} tok/s" if c else "-",
                targets,
            )
        console.print(table)
        console.print(f"  runtime store: {plan['runtime']['store_path']}")
        for key, model in plan["models"].items():
            console.print(f"  model {key}: {model['store_path']}")
        for u in plan["unresolved"]:
            console.print(f"  [yellow]unresolved[/]: {escape(u)} (a deploy refuses this host until it is pinned)", highlight=False)
        for w in plan["warnings"]:
            console.print(f"  [yellow]warning[/]: {escape(w)}", highlight=False)
        for a in plan.get("advice", []):
            console.print(f"  [cyan]advice[/]: {escape(a)}", highlight=False)
    for p in problems:
        print(f"{'refused' if p.severity == 'error' else 'warning'}: {p}", file=sys.stderr)


STATUS_STYLE = {"fired": "bold", "passed": "green", "not_applicable": "dim", "unknown": "yellow"}


def _explain_human(explained: list[dict[str, Any]]) -> None:
    from rich.table import Table

    console = _console()
    for host in explained:
        console.print(f"[bold]{host['host']}[/]  ·  {host.get('hardware_profile', '?')}  ·  {host.get('runtime', '?')}", highlight=False)
        for inst in host["instances"]:
            a: rules.Analysis | None = inst["analysis"]
            if a is None:
                console.print(f"  instance {inst['name']} ({inst['model']}): not analysed (unknown model)")
                continue
            lay = a.layout
            console.print(
                f"  instance [bold]{inst['name']}[/] ({inst['model']}): tp {lay.tp} × pp {lay.pp} on gpus {list(lay.gpus)}, "
                f"max_model_len {lay.max_model_len}",
                highlight=False,
            )
            table = Table(show_lines=False, pad_edge=False)
            for col in ("rule", "verdict", "result", "why"):
                table.add_column(col, overflow="fold")
            for r in a.results:
                result = {"fired": r.verdict.upper(), "passed": "passed", "not_applicable": "n/a", "unknown": "unknown"}[r.status]
                why = r.message if r.status in ("fired", "unknown") else r.why
                if r.status == "fired" and r.valid:
                    why += f" (valid: {r.valid})"
                table.add_row(r.id, r.verdict, f"[{STATUS_STYLE[r.status]}]{result}[/]", escape(why))
            console.print(table)
            console.print("  capacity:")
            if a.capacity is None:
                console.print(f"    not computed: {escape(str(a.capacity_error))}", highlight=False)
            else:
                for step in a.capacity["steps"]:
                    console.print(f"    {escape(step)}", highlight=False)
        problems = host["problems"]
        errors = [p for p in problems if p.severity == "error"]
        if errors:
            for p in errors:
                console.print(f"  [red]refused[/]: {escape(str(p))}", highlight=False)
        else:
            console.print("  [green]accepted[/]", highlight=False)
        for p in problems:
            if p.severity == "warning":
                console.print(f"  [yellow]warning[/]: {escape(str(p))}", highlight=False)
        for adv in host["advice"]:
            console.print(f"  [cyan]advice[/]: {escape(adv)}", highlight=False)
        console.print()


def _explain_json(explained: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for host in explained:
        instances = []
        for inst in host["instances"]:
            a = inst["analysis"]
            instances.append(
                {
                    "name": inst["name"],
                    "model": inst["model"],
                    "rules": [
                        {**r.to_dict(), "title": r.title, "reference": r.reference, "field": r.field} for r in (a.results if a else [])
                    ],
                    "capacity": a.capacity if a else None,
                    "capacity_error": a.capacity_error if a else "unknown model",
                }
            )
        out[host["host"]] = {"instances": instances}
    return out


def _recommend_context(args: argparse.Namespace, lock: Lock) -> tuple[str, Any, str]:
    """(hardware key, hardware profile, runtime key) from the flags or the inventory's first host."""
    hw_key, hw, runtime_key = args.hardware, None, args.runtime
    if args.inventory:
        hosts = load_inventory(args.inventory, args.limit)
        host = sorted(hosts)[0]
        spec = parse_spec(host, hosts[host])
        if hw_key is None:
            hw_key, hw = resolve_hardware(host, spec)
        runtime_key = runtime_key or spec.runtime
    if hw is None:
        from ..spec import builtin_hardware_profiles

        profiles = builtin_hardware_profiles()
        if hw_key is None:
            raise InputError(f"--recommend needs --hardware (one of {', '.join(sorted(profiles))}) or -i INVENTORY")
        if hw_key not in profiles:
            raise InputError(f"--hardware {hw_key}: unknown hardware profile (known: {', '.join(sorted(profiles))})")
        hw = profiles[hw_key]
    if runtime_key is None:
        raise InputError(f"--recommend needs --runtime (one of {', '.join(sorted(lock.runtimes))}) or -i INVENTORY")
    if runtime_key not in lock.runtimes:
        raise InputError(f"--runtime {runtime_key}: not in the lock (known: {', '.join(sorted(lock.runtimes))})")
    return hw_key, hw, runtime_key


def _candidate_row(c: rules.Candidate) -> dict[str, Any]:
    cap = c.analysis.capacity or {}
    return {
        "tensor_parallel": c.layout.tp,
        "pipeline_parallel": c.layout.pp,
        "gpus": list(c.layout.gpus),
        "weights_bytes_per_gpu": cap.get("weights", {}).get("max_bytes_per_gpu"),
        "kv_tokens": cap.get("kv", {}).get("tokens"),
        "max_concurrency": cap.get("kv", {}).get("max_concurrency"),
        "largest_max_model_len": cap.get("kv", {}).get("largest_max_model_len"),
        "decode_tokens_per_s_bound": cap.get("decode", {}).get("tokens_per_s_bound"),
        "warnings": [r.id for r in c.analysis.fired("warn")] + [r.id for r in c.analysis.unknown],
        "advice": [r.id for r in c.analysis.fired("advise")],
        "refused_by": [{"rule": r.id, "message": r.message, "valid": r.valid} for r in c.analysis.fired("refuse")],
    }


def _recommend(args: argparse.Namespace) -> int:
    lock = load_lock(args.lock)
    model = lock.models.get(args.recommend)
    if model is None:
        raise InputError(f"--recommend {args.recommend}: not a model of the lock (known: {', '.join(sorted(lock.models))})")
    hw_key, hw, runtime_key = _recommend_context(args, lock)
    runtime = lock.runtimes[runtime_key]
    max_len = args.max_model_len or min(DEFAULT_RECOMMEND_LEN, model.architecture.max_position_embeddings)
    valid, dropped = rules.recommend(
        args.recommend,
        model,
        runtime_key,
        runtime,
        hw,
        hw_key,
        max_len,
        gpu_memory_utilization=args.gpu_memory_utilization,
        kv_cache_memory_bytes=args.kv_cache_memory_bytes,
    )
    if args.json:
        dump_json(
            {
                "schema": RECOMMEND_ENVELOPE,
                "model": args.recommend,
                "hardware_profile": hw_key,
                "runtime": runtime_key,
                "engine_version": runtime.vllm_version,
                "max_model_len": max_len,
                "ranking": rules.RANKING,
                "ranked": [_candidate_row(c) for c in valid],
                "dropped": [_candidate_row(c) for c in dropped],
            }
        )
        return ExitCode.OK if valid else ExitCode.REFUSED
    from rich.table import Table

    console = _console()
    table = Table(
        title=f"{args.recommend} on {hw_key} ({hw.device_count} × {hw.device_model}) · {runtime_key} (vLLM {runtime.vllm_version}) · "
        f"max_model_len {max_len}",
        caption=f"ranked: {rules.RANKING}; decode ≤: batch-1 memory-bandwidth bound",
    )
    for col in ("#", "tp×pp", "gpus", "weights/GPU", "KV tokens", "conc.@len", "max len", "decode ≤", "warnings / advice"):
        table.add_column(col, overflow="fold")
    for i, c in enumerate(valid, 1):
        row = _candidate_row(c)
        notes = ", ".join([f"[yellow]{w}[/]" for w in row["warnings"]] + row["advice"]) or "-"
        table.add_row(
            str(i),
            f"{c.layout.tp}×{c.layout.pp}",
            ",".join(map(str, c.layout.gpus)),
            fmt_bytes(row["weights_bytes_per_gpu"]) if row["weights_bytes_per_gpu"] is not None else "-",
            str(row["kv_tokens"]),
            f"{row['max_concurrency']:.2f}",
            str(row["largest_max_model_len"]),
            f"{row['decode_tokens_per_s_bound']:g} tok/s",
            notes,
        )
    console.print(table)
    if not valid:
        console.print("  no valid layout on this profile")
    for c in dropped:
        row = _candidate_row(c)
        first = row["refused_by"][0]
        others = [r["rule"] for r in row["refused_by"][1:]]
        more = f" (+{len(others)} more: {', '.join(others)})" if others else ""
        where = f"{c.layout.tp}×{c.layout.pp} on gpus {list(c.layout.gpus)}"
        console.print(f"  [red]dropped[/] {where}: {first['rule']}: {escape(first['message'])}{more}", highlight=False)
    return ExitCode.OK if valid else ExitCode.REFUSED


def _record_gpus(args: argparse.Namespace) -> int:
    from ..measured import record_gpus

    env = record_gpus(args.inventory, args.limit)
    if args.json:
        dump_json(env)
    else:
        console = _console()
        for host, topology in sorted(env["recorded"].items()):
            console.print(f"[green]recorded[/] {host}: " + "; ".join(" ".join(row) for row in topology), highlight=False)
        for host, reason in sorted(env["errors"].items()):
            console.print(f"[red]not recorded[/] {host}: {escape(reason)}", highlight=False)
        if env["recorded"]:
            console.print(f"written: {env['file']} (commit it with the inventory; plan again to see the layouts it gives)", highlight=False)
    return ExitCode.OK if env["ok"] else ExitCode.ERROR


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.schema:
        from ..plan_schema import json_schema_text

        sys.stdout.write(json_schema_text())
        return ExitCode.OK
    if args.write_schema:
        from ..plan_schema_gen import write_generated

        repo = Path(__file__).resolve().parents[3]
        written = write_generated(repo)
        for path in written:
            print(f"written: {path.relative_to(repo)}")
        if not written:
            print("the generated files are current")
        return ExitCode.OK
    if not args.recommend and not args.inventory:
        p.error("the following arguments are required: -i/--inventory (or --recommend MODEL)")

    def _main() -> int:
        args.limit = deprecated_limit(args, "plan.py")
        if args.recommend:
            return _recommend(args)
        if args.record_gpus:
            return _record_gpus(args)
        everyone, selected = load_inventory_limited(args.inventory, args.limit)
        hosts = {h: everyone[h] for h in selected if h in everyone}
        lock = load_lock(args.lock)
        plans, problems = evaluate_fleet(everyone, lock, only=selected)
        unresolved = {h: p["unresolved"] for h, p in plans.items() if p["unresolved"]}
        ok = not problems and not (args.strict and unresolved)
        explained = [explain_host(h, hosts[h], lock) for h in sorted(hosts)] if args.explain else []
        if args.json:
            envelope: dict[str, Any] = {
                "schema": ENVELOPE,
                "ok": ok,
                "plans": plans,
                "problems": [p.to_dict() for p in problems],
            }
            if args.explain:
                envelope["explain"] = _explain_json(explained)
            dump_json(envelope)
        elif args.explain:
            _explain_human(explained)
            if args.strict:
                for h, items in unresolved.items():
                    for u in items:
                        print(f"refused: {h}: {u}", file=sys.stderr)
        else:
            _human(plans, problems)
            if args.strict:
                for h, items in unresolved.items():
                    for u in items:
                        print(f"refused: {h}: {u}", file=sys.stderr)
        return ExitCode.OK if ok else ExitCode.REFUSED

    return run(_main)
