"""llmfleet_summary: the fleet rollout summary.

A notification callback: it never replaces stdout. At the end of the run (v2_playbook_on_stats,
which runs even when max_fail_percentage / any_errors_fatal stopped the rollout) it prints a table
per host and writes summary.json (schema llmfleet.rollout/1) atomically to $LLMFLEET_RUN_DIR or
<playbook dir>/out/runs/<UTC timestamp>-<playbook>/, plus out/runs/latest.json.

Contract with the playbooks: a host sets the fact `llmfleet_report` (set_fact; each one replaces the
last) with any of generation_before, generation_after, generation_planned, switched, verify,
rolled_back, rolled_back_to, failure, batch, converged (the rollout's fast path found the host done)
and repaired (store paths rebuilt in place of damaged ones). The callback adds times, status,
failure and batch.
It stays silent unless some host reported or the playbook is site.yml / rollback.yml, and it never
raises: a broken summary must not break a rollout.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import tempfile
import time
from typing import Any

from ansible.plugins.callback import CallbackBase

DOCUMENTATION = """
    name: llmfleet_summary
    type: notification
    short_description: per-host fleet rollout summary (table and summary.json)
    description:
      - Prints a per-host rollout table at the end of the run and writes it as versioned JSON.
    requirements:
      - enable in callbacks_enabled
"""

SCHEMA = "llmfleet.rollout/1"
REPORT_FACT = "llmfleet_report"
LLMFLEET_PLAYBOOKS = {"site.yml", "rollback.yml"}
REPORT_KEYS = (
    "generation_before", "generation_after", "generation_planned", "switched", "verify",
    "rolled_back", "rolled_back_to", "failure", "batch", "converged", "repaired",
)
MSG_MAX = 200


def _one_line(msg: Any, limit: int = MSG_MAX) -> str:
    text = " ".join(str(msg).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return _dt.datetime.fromtimestamp(ts, _dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "notification"
    CALLBACK_NAME = "llmfleet_summary"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._started = time.time()
        self._playbook_path: str | None = None
        self._hosts: dict[str, dict[str, Any]] = {}
        self._order: list[str] = []
        self._batch_counter: dict[str, int] = {}
        self._current_batch: int | None = None
        self._warned = False
        self.written_path: str | None = None

    # ---------------------------------------------------------------- safety
    def _safe(self, fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except Exception as exc:  # never break a rollout
            if not self._warned:
                self._warned = True
                with contextlib.suppress(Exception):
                    self._display.warning(f"llmfleet_summary: {type(exc).__name__}: {exc}")

    def _host(self, name: str) -> dict[str, Any]:
        if name not in self._hosts:
            self._hosts[name] = {"report": {}, "first": None, "last": None, "bfirst": None, "blast": None, "status": "not reached",
                                 "failure": None, "unreachable": None, "batch": None, "seen": False}
            self._order.append(name)
        return self._hosts[name]

    def _touch(self, name: str) -> dict[str, Any]:
        h = self._host(name)
        now = time.time()
        if h["first"] is None:
            h["first"] = now
        h["last"] = now
        if self._current_batch is not None:  # time in its batch, not waiting for the batches before
            if h["bfirst"] is None:
                h["bfirst"] = now
            h["blast"] = now
        # reached: worked on in a batch of a serial play (site.yml's validate play plans every host on
        # the control node first; that does not touch the host)
        if self._current_batch is not None:
            h["seen"] = True
        if h["batch"] is None and self._current_batch is not None:
            h["batch"] = self._current_batch
        return h

    # ---------------------------------------------------------------- events
    def v2_playbook_on_start(self, playbook: Any) -> None:
        self._safe(self._on_start, playbook)

    def _on_start(self, playbook: Any) -> None:
        self._started = time.time()
        self._playbook_path = os.path.abspath(getattr(playbook, "_file_name", "") or "") or None

    def v2_playbook_on_play_start(self, play: Any) -> None:
        self._safe(self._on_play_start, play)

    def _on_play_start(self, play: Any) -> None:
        # PlaybookExecutor restricts the inventory to the batch, then TaskQueueManager.run
        # announces the play: once per serial batch.
        inventory = play.get_variable_manager()._inventory
        pattern = play.hosts
        batch_hosts = [h.name for h in inventory.get_hosts(pattern)]
        all_hosts = [h.name for h in inventory.get_hosts(pattern, ignore_restrictions=True)]
        serial = getattr(play, "serial", None)
        if serial:
            key = str(getattr(play, "_uuid", None) or play.get_name())
            self._batch_counter[key] = self._batch_counter.get(key, 0) + 1
            self._current_batch = self._batch_counter[key]
        else:
            self._current_batch = None
        for name in all_hosts:
            self._host(name)
        if self._current_batch is not None:
            for name in batch_hosts:
                h = self._host(name)
                if h["batch"] is None:
                    h["batch"] = self._current_batch

    def v2_runner_on_start(self, host: Any, task: Any) -> None:
        self._safe(lambda: self._touch(host.get_name()))

    def _result(self, result: Any, status: str) -> None:
        name = result._host.get_name()
        h = self._touch(name)
        res = result._result if isinstance(getattr(result, "_result", None), dict) else {}
        facts = res.get("ansible_facts") or {}
        report = facts.get(REPORT_FACT) if isinstance(facts, dict) else None
        if isinstance(report, dict):
            h["report"] = {k: report[k] for k in REPORT_KEYS if k in report}
            h["seen"] = True
        if status in ("failed", "unreachable"):
            h["seen"] = True
        if status == "ok":
            if h["status"] not in ("failed", "unreachable"):
                h["status"] = "ok"
        elif status == "failed":
            # a host failed because it could not be reached stays "unreachable"
            h["status"] = "unreachable" if h["status"] == "unreachable" else "failed"
            h["failure"] = _one_line(res.get("msg") or res.get("stderr") or res.get("exception") or "failed")
        elif status == "unreachable":
            h["status"] = "unreachable"
            h["unreachable"] = _one_line(res.get("msg") or "unreachable")

    def v2_runner_on_ok(self, result: Any) -> None:
        self._safe(self._result, result, "ok")

    def v2_runner_on_skipped(self, result: Any) -> None:
        self._safe(self._result, result, "ok")

    def v2_runner_on_failed(self, result: Any, ignore_errors: bool = False) -> None:
        self._safe(self._result, result, "ok" if ignore_errors else "failed")

    def v2_runner_on_unreachable(self, result: Any) -> None:
        self._safe(self._result, result, "unreachable")

    def v2_playbook_on_stats(self, stats: Any) -> None:
        self._safe(self._finish, stats)

    # ---------------------------------------------------------------- output
    def involved(self) -> bool:
        name = os.path.basename(self._playbook_path or "")
        return name in LLMFLEET_PLAYBOOKS or any(h["report"] for h in self._hosts.values())

    def build(self, finished: float | None = None) -> dict[str, Any]:
        finished = time.time() if finished is None else finished
        hosts: dict[str, Any] = {}
        totals = {"hosts": 0, "switched": 0, "rolled_back": 0, "failed": 0, "unreachable": 0, "not_reached": 0, "ok": 0}
        for name in self._order:
            h = self._hosts[name]
            r = h["report"]
            status = h["status"] if h["seen"] else "not reached"
            first, last = (h["bfirst"], h["blast"]) if h["bfirst"] is not None else (h["first"], h["last"])
            failure = r.get("failure") or h["failure"] or h["unreachable"]
            if status == "ok" and r.get("failure"):
                status = "failed"  # a host that went back by itself and then stopped cleanly
            entry = {
                "status": status,
                "batch": r.get("batch", h["batch"]),
                "generation_before": r.get("generation_before"),
                "generation_after": r.get("generation_after"),
                "generation_planned": r.get("generation_planned"),
                "switched": bool(r.get("switched", False)),
                "verify": r.get("verify", "not measured"),
                "rolled_back": bool(r.get("rolled_back", False)),
                "rolled_back_to": r.get("rolled_back_to"),
                "converged": bool(r.get("converged", False)),
                "repaired": list(r.get("repaired") or []),
                "failure": _one_line(failure) if failure else None,
                "started": _iso(first),
                "finished": _iso(last),
                "duration_s": round(last - first, 1) if first is not None and last is not None else None,
            }
            hosts[name] = entry
            totals["hosts"] += 1
            totals["switched"] += entry["switched"]
            totals["rolled_back"] += entry["rolled_back"]
            key = {"ok": "ok", "failed": "failed", "unreachable": "unreachable"}.get(status, "not_reached")
            totals[key] += 1
        ok = totals["hosts"] > 0 and totals["ok"] == totals["hosts"]
        return {"schema": SCHEMA, "playbook": self._playbook_path, "started": _iso(self._started),
                "finished": _iso(finished), "wall_s": round(finished - self._started, 1), "ok": ok,
                "hosts": hosts, "totals": totals}

    def _run_dir(self, finished: float) -> tuple[str, str | None]:
        env = os.environ.get("LLMFLEET_RUN_DIR")
        if env:
            return env, None
        base = os.path.dirname(self._playbook_path or os.getcwd()) if self._playbook_path else os.getcwd()
        runs = os.path.join(base, "out", "runs")
        stamp = _dt.datetime.fromtimestamp(finished, _dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        book = os.path.splitext(os.path.basename(self._playbook_path or "run"))[0]
        return os.path.join(runs, f"{stamp}-{book}"), runs

    @staticmethod
    def _atomic_write(path: str, text: str) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".summary-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def _finish(self, stats: Any) -> None:
        if not self.involved():
            return
        finished = time.time()
        doc = self.build(finished)
        self._display.banner("LLMFLEET ROLLOUT SUMMARY")
        for line in self.render(doc):
            self._display.display(line)
        run_dir, runs = self._run_dir(finished)
        text = json.dumps(doc, indent=2, sort_keys=False) + "\n"
        path = os.path.join(run_dir, "summary.json")
        self._atomic_write(path, text)
        if runs is not None:
            self._atomic_write(os.path.join(runs, "latest.json"), text)
        self.written_path = path
        self._display.display(f"summary: {path}")

    @staticmethod
    def render(doc: dict[str, Any]) -> list[str]:
        head = ("host", "batch", "generation", "verify", "rollback", "time", "status")
        rows = [head]
        for name, e in doc["hosts"].items():
            gen = f"{e['generation_before'] or '-'} → {e['generation_after'] or '-'}"
            rb = f"to {e['rolled_back_to'] or '?'}" if e["rolled_back"] else "-"
            t = f"{e['duration_s']}s" if e["duration_s"] is not None else "-"
            st = e["status"] + (" (converged)" if e.get("converged") else "") + (f": {e['failure']}" if e["failure"] else "")
            if e.get("repaired"):
                st += f"; repaired {', '.join(e['repaired'])}"
            rows.append((name, str(e["batch"] if e["batch"] is not None else "-"), gen, str(e["verify"]), rb, t, st))
        widths = [max(len(r[i]) for r in rows) for i in range(len(head) - 1)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1] for r in rows]
        t = doc["totals"]
        lines.append(f"wall {doc['wall_s']}s; {t['hosts']} hosts: {t['switched']} switched, {t['rolled_back']} rolled back, "
                     f"{t['failed']} failed, {t['unreachable']} unreachable, {t['not_reached']} not reached")
        return lines
