"""What a run leaves behind: the Prometheus textfile, the HTML plot, the envelope's new parts."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from conftest import RunCli
from fake_vllm import Behaviour, serve
from llmfleet.verify import prometheus, textfile
from llmfleet.verify.config import VerifyConfig
from llmfleet.verify.results import Outcome

LOAD = ("--requests", "4", "--prompt-tokens", "16", "--output-tokens", "8")
SAMPLE_RE = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*\{([a-zA-Z_][a-zA-Z0-9_]*="(\\.|[^"\\])*",?)*\} \S+$')


def lint_textfile(text: str) -> dict[str, str]:
    """What promtool would insist on for a textfile: one HELP and TYPE per family before its samples,
    samples of a family together, valid lines; returns family → type."""
    types: dict[str, str] = {}
    helps: set[str] = set()
    seen_samples: set[str] = set()
    current = None
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name = line.split()[2]
            assert name not in helps, f"two HELP lines for {name}"
            helps.add(name)
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            assert name not in types, f"two TYPE lines for {name}"
            types[name] = kind
            current = name
        elif line.startswith("#"):
            continue
        else:
            assert SAMPLE_RE.match(line), line
            name = line.split("{", 1)[0]
            assert name == current, f"{name} outside its family block"
            seen_samples.add(name)
    assert seen_samples == set(types) == helps
    return types


def test_textfile_of_a_good_run(run_cli: RunCli, tmp_path: Path) -> None:
    path = tmp_path / "llmfleet_verify_tiny.prom"
    with serve(Behaviour()) as (url, _):
        r = run_cli("--url", url, *LOAD, "--concurrency", "2,1", "--textfile", str(path))
    assert r.code == 0, r.err
    text = path.read_text()
    assert oct(path.stat().st_mode & 0o777) == "0o644"
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind
    types = lint_textfile(text)
    assert set(types.values()) == {"gauge"}
    expo = prometheus.parse(text)
    # Prometheus owns `instance`: ours is llmfleet_instance
    assert all("instance" not in s.labels and s.labels["llmfleet_instance"] == url.split("//")[1] for s in expo.samples)
    assert expo.total("llmfleet_verify_exit_code") == 0 and expo.total("llmfleet_verify_ok") == 1
    assert expo.total("llmfleet_verify_requests", {"concurrency": "2", "outcome": "complete"}) == 4
    assert expo.total("llmfleet_verify_requests", {"concurrency": "1", "phase": "level", "outcome": "failed"}) == 0
    assert len(expo.select("llmfleet_verify_latency_seconds", {"metric": "ttft", "concurrency": "2"})) == 4  # p50 p90 p95 p99
    assert expo.total("llmfleet_verify_check", {"check": "load_requests", "verdict": "pass"}) == 1
    assert expo.total("llmfleet_verify_kv_cache_tokens") == 1024 * 16
    assert expo.total("llmfleet_verify_longest_prompt_tokens") == 2047


def test_textfile_when_the_run_cannot_measure(run_cli: RunCli, tmp_path: Path) -> None:
    path = tmp_path / "v.prom"
    r = run_cli("--url", "http://127.0.0.1:9", "--ready-timeout", "0.2", "--textfile", str(path))
    assert r.code == 1
    expo = prometheus.parse(path.read_text())
    assert expo.total("llmfleet_verify_exit_code") == 1 and expo.total("llmfleet_verify_ok") == 0
    lint_textfile(path.read_text())
    # not even a plan to read: still a textfile, so that the alert fires
    bad = tmp_path / "bad.prom"
    r = run_cli("--plan", str(tmp_path / "missing.json"), "--instance", "tiny", "--textfile", str(bad))
    assert r.code == 1
    text = bad.read_text()
    assert text.startswith("# verify could not run: cannot read plan")
    assert prometheus.parse(text).total("llmfleet_verify_exit_code", {"llmfleet_instance": "tiny"}) == 1


def test_textfile_label_values_are_escaped() -> None:
    out = Outcome(VerifyConfig(url="http://h:1", instance="a", model='we"ird\\mo\ndel', generation="g"), "t")
    text = textfile.render(out, now=1.0)
    lint_textfile(text)
    s = prometheus.parse(text).select("llmfleet_verify_exit_code")[0]
    assert s.labels == {"llmfleet_instance": "a", "model": 'we"ird\\mo\ndel', "generation": "g"}


def test_unwritable_outputs_are_a_one_line_error(run_cli: RunCli, tmp_path: Path) -> None:
    with serve(Behaviour()) as (url, _):
        r = run_cli("--url", url, *LOAD, "--no-ladder", "--plot", str(tmp_path / "no" / "such" / "dir.html"))
    assert r.code == 1 and r.err.startswith("verify: cannot write ") and r.err.count("\n") == 1


def test_plot_is_a_self_contained_page(run_cli: RunCli, tmp_path: Path) -> None:
    path = tmp_path / "v.html"
    with serve(Behaviour(token_delay=0.001)) as (url, _):
        r = run_cli("--url", url, *LOAD, "--concurrency", "1", "--sweep", "--sweep-max-concurrency", "2", "--plot", str(path))
    assert r.code == 0, r.err
    page = path.read_text()
    assert (
        page.startswith("<!DOCTYPE html>")
        and "<script" not in page
        and "http" not in page.replace(url, "").replace('xmlns="http://www.w3.org/2000/svg"', "")
    )
    svgs = re.findall(r"<svg.*?</svg>", page, re.S)
    titles = [ET.fromstring(s).findtext("{http://www.w3.org/2000/svg}title") for s in svgs]
    assert titles == [
        "TTFT distribution", "TPOT distribution", "ITL distribution", "E2EL distribution",
        "Throughput against concurrency", "Latency against concurrency", "Context ladder: prompt + 1 token",
    ]  # fmt: skip
    assert "c=1 *" in page and "c=2" in page and "result: all targets met (exit 0)" in page


def test_envelope_carries_the_new_parts(run_cli: RunCli) -> None:
    with serve(Behaviour()) as (url, _):
        r = run_cli("--url", url, *LOAD, "--json")
    env = json.loads(r.out)
    assert r.code == 0, r.err
    assert set(env) >= {"run_id", "duration_s", "plan", "levels", "sweep", "ladder", "history"}
    assert env["load"]["ttft_s"].keys() == {"count", "mean", "p50", "p90", "p95", "p99", "max"}
    assert env["load"]["refused"] == 0 and "server" not in env["load"]
    assert len(env["levels"]) == 1 and env["levels"][0]["phase"] == "target"


@pytest.mark.parametrize("use_rich", [True, False])
def test_human_output_shows_levels_ladder_and_definitions(run_cli: RunCli, use_rich: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    from llmfleet.verify import report

    monkeypatch.setattr(report, "HAVE_RICH", use_rich and report.HAVE_RICH)
    with serve(Behaviour()) as (url, _):
        r = run_cli("--url", url, *LOAD, "--concurrency", "2,1")
    assert r.code == 0, r.err
    for word in ("context ladder (prompt tokens, 1 output token): 256 ok", "2049 HTTP 400", "concurrency", "target", "level",
                 "server mean", "p90", "TTFT: request sent → first content chunk", "result: all targets met (exit 0)"):  # fmt: skip
        assert word in r.out, word
