"""The lab fleet: four nspawn hosts (inventory/lab-fleet) rolled out with site.yml, then broken on purpose.

The session boots the fleet once (``tools/lab.py up --fresh``), rolls it out, runs the scenarios of
test_fleet.py in order (each starts from the state the one before left) and stops the hosts.
Figures (wall times, downtime) are printed in the terminal summary and written to
``out/fleet/figures.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from llmfleet.artifacts.cache import manifest, revision, sha256_file
from testhub import TestHub
from testhub.checkpoints import folder

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
INVENTORY = REPO / "inventory" / "lab-fleet"
HOSTS_FILE = INVENTORY / "hosts.yml"
HOSTS = ("fl1", "fl2", "fl3", "fl4")
LAB_DIR = Path(os.environ.get("LLMFLEET_LAB_DIR") or REPO / ".lab")
CACHE = Path(os.environ.get("LLMFLEET_CACHE") or Path.home() / ".cache" / "llmfleet")
OUT = REPO / "out" / "fleet"
ROOT = "/var/lib/llmfleet"
MODEL = "tiny-llama"

#: name -> value, printed at the end of the session and written to out/fleet/figures.json
FIGURES: dict[str, Any] = {}


@dataclass
class Run:
    argv: list[str]
    rc: int
    output: str
    wall_s: float
    summary: dict[str, Any] | None = None

    def host_summary(self, host: str) -> dict[str, Any]:
        assert self.summary is not None, "the run wrote no summary.json"
        return dict(self.summary["hosts"][host])

    def failures(self, limit: int = 6000) -> str:
        """What failed, for an assertion message: every fatal/failed task block and the recap."""
        blocks: list[str] = []
        task = ""
        lines = self.output.splitlines()
        for i, line in enumerate(lines):
            if line.startswith("TASK ["):
                task = line
            elif line.startswith(("fatal: [", "failed: [")):
                end = next((j for j in range(i + 1, len(lines)) if not lines[j].strip()), len(lines))
                blocks.append(task + "\n" + "\n".join(lines[i:end])[:1500])
        recap = self.output.split("PLAY RECAP", 1)[-1] if "PLAY RECAP" in self.output else ""
        text = f"exit {self.rc}; {' '.join(self.argv[1:])}\n" + "\n".join(blocks) + "\nPLAY RECAP" + recap
        return text[-limit:]

    def __repr__(self) -> str:  # pytest prints this in assertion introspection: keep it short
        return f"Run(rc={self.rc}, {Path(self.argv[3]).name if len(self.argv) > 3 else self.argv}, {self.wall_s:.0f} s)"


def env(**extra: str) -> dict[str, str]:
    base = dict(os.environ)
    base.update(
        ANSIBLE_CONFIG=str(REPO / "ansible.cfg"),
        LLMFLEET_LAB_DIR=str(LAB_DIR),
        LLMFLEET_CACHE=str(CACHE),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_FORCE_COLOR="0",
        PATH=f"{BIN}:{base.get('PATH', '')}",
    )
    base.update(extra)
    return base


_RUNS = 0


def playbook(playbook: str, *args: str, lock: Path | None = None, timeout: float = 1800, **extra_env: str) -> Run:
    """Run one playbook on the fleet; its output goes to out/fleet/runs/NN-<name>.log."""
    global _RUNS
    _RUNS += 1
    run_dir = OUT / "runs" / f"{_RUNS:02d}-{Path(playbook).stem}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    argv = [str(BIN / "ansible-playbook"), "-i", str(INVENTORY), str(REPO / playbook), *args]
    extra = dict(extra_env, LLMFLEET_RUN_DIR=str(run_dir))
    if lock is not None:
        extra["LLMFLEET_LOCK"] = str(lock)
    started = time.monotonic()
    proc = subprocess.run(argv, cwd=REPO, env=env(**extra), capture_output=True, text=True, timeout=timeout, check=False)
    wall = time.monotonic() - started
    output = proc.stdout + proc.stderr
    (run_dir / "ansible.log").write_text(" ".join(argv) + "\n\n" + output)
    summary_file = run_dir / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else None
    return Run(argv, proc.returncode, output, wall, summary)


def ssh(host: str, command: str, check: bool = True) -> str:
    proc = subprocess.run(
        ["ssh", "-F", str(LAB_DIR / "ssh_config"), host, command], capture_output=True, text=True, timeout=120, check=False
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"ssh {host} {command!r}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def machine_path(host: str, path: str) -> Path:
    """A path inside a lab host, read from the control node (the host's machine root)."""
    return LAB_DIR / "machines" / host / path.lstrip("/")


def current(host: str) -> str:
    return os.path.basename(os.readlink(machine_path(host, f"{ROOT}/current")))


def generations(host: str) -> set[str]:
    return {p.name for p in machine_path(host, f"{ROOT}/generations").iterdir()}


def history(host: str) -> list[dict[str, Any]]:
    return list(json.loads(machine_path(host, f"{ROOT}/history.json").read_text())["entries"])


def health(host: str, port: int = 8000) -> int | None:
    """GET /health from inside the host's network namespace (vLLM listens on its loopback)."""
    proc = subprocess.run(
        ["ip", "netns", "exec", f"llmf-{host}", "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-m", "5",
         f"http://127.0.0.1:{port}/health"],
        capture_output=True, text=True, check=False,
    )
    return int(proc.stdout) if proc.stdout.strip().isdigit() and proc.stdout.strip() != "000" else None


def served_root(host: str, port: int = 8000) -> str:
    proc = subprocess.run(
        ["ip", "netns", "exec", f"llmf-{host}", "curl", "-s", "-m", "5", f"http://127.0.0.1:{port}/v1/models"],
        capture_output=True, text=True, check=True,
    )
    return str(json.loads(proc.stdout)["data"][0]["root"])


POLLER = r"""
import sys, time, urllib.request
url, last = sys.argv[1], None
while True:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            ok = r.status == 200
    except Exception:
        ok = False
    if ok != last:
        print(f"{time.monotonic():.3f} {int(ok)}", flush=True)
        last = ok
    time.sleep(0.02)
"""


class Downtime:
    """Polls a host's /health every 20 ms from inside its network namespace; the longest time it was not 200.

    ``restarted`` (after :meth:`stop`): the poller saw the instance answer 200, stop answering and
    answer 200 again. A downtime of 0.0 alone cannot tell a restart that was never made from one
    too quick to see; a restart of vLLM takes seconds, so a real one is always seen.
    """

    def __init__(self, host: str, port: int = 8000) -> None:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", f"llmf-{host}", sys.executable, "-u", "-c", POLLER, f"http://127.0.0.1:{port}/health"],
            stdout=subprocess.PIPE, text=True,
        )
        self.events: list[tuple[float, bool]] = []
        self.restarted = False
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        deadline = time.monotonic() + 10
        while not self.events and time.monotonic() < deadline:
            time.sleep(0.05)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            t, ok = line.split()
            self.events.append((float(t), ok == "1"))

    def stop(self) -> float:
        end = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=10)
        self.reader.join(timeout=5)
        longest, down_since = 0.0, None
        for t, ok in self.events:
            if not ok and down_since is None:
                down_since = t
            elif ok and down_since is not None:
                longest, down_since = max(longest, t - down_since), None
        if down_since is not None:
            longest = max(longest, end - down_since)
        states = [ok for _, ok in self.events]
        self.restarted = bool(states) and states[0] and states[-1] and False in states
        return round(longest, 2)


# --- pins: variants of the tiny model's pin, as a new upstream revision would bring -------------


@dataclass
class Variant:
    """A lock whose tiny-llama pin points at changed files, and the mirror (models dir) holding them."""

    lock: Path
    models: Path
    files: dict[str, Path] = field(default_factory=dict)

    def extra_vars(self) -> list[str]:
        return ["-e", f"model_store_source_dir={self.models}"]

    def store_path(self) -> str:
        from llmfleet.pins import load_lock, model_store_name

        return f"{ROOT}/store/{model_store_name(MODEL, load_lock(self.lock).models[MODEL])}"


def publish_blobs(base: Path, files: Iterable[Path]) -> None:
    """Offer files to the sites' mirrors: link each into ``<base>/blobs/sha256/`` (the upstream serves it)."""
    for f in files:
        dst = base / "blobs" / "sha256" / sha256_file(f)
        if not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.link(f, dst)


def variant(base: Path, name: str, change: Callable[[Path], None]) -> Variant:
    """Copy the tiny model, change it, pin the result (sha256 and size of every file) in a copy of the lock,
    and offer its files to the mirrors (a variant's files stand in for what a new revision brings)."""
    models = base / name / "models"
    model_dir = models / MODEL
    shutil.copytree(CACHE / "models" / MODEL, model_dir)
    change(model_dir)
    files = manifest(model_dir)
    publish_blobs(base, (model_dir / f.path for f in files))
    doc = json.loads((REPO / "pins" / "lock.json").read_text())
    pin = doc["models"][MODEL]
    pin["files"] = [f.model_dump() for f in files]
    pin["revision"] = revision(files)
    pin["notes"] = f"test variant {name} of the tiny model (tests/fleet)"
    lock = base / name / "lock.json"
    lock.write_text(json.dumps(doc, indent=2, sort_keys=True))
    return Variant(lock, models, {f.path: model_dir / f.path for f in files})


#: the repo the test hub serves the tiny model's new revisions under
HUB_REPO = "llmfleet-lab/tiny-llama"


def hub_variant(hub: TestHub, base: Path, name: str, change: Callable[[Path], None], include: Sequence[str] = ()) -> Variant:
    """A new revision of the tiny model published on the test hub, pinned and fetched with tools/pin.py
    (``model add`` into a copy of the lock, ``fetch`` into a cache of its own), as an operator would."""
    src = base / name / "published"
    shutil.copytree(CACHE / "models" / MODEL, src)
    change(src)
    hub.publish(HUB_REPO, folder(src))
    lock, cache = base / name / "lock.json", base / name / "cache"
    shutil.copy(REPO / "pins" / "lock.json", lock)
    pin_env = env(LLMFLEET_LOCK=str(lock), LLMFLEET_CACHE=str(cache), HF_ENDPOINT=hub.endpoint, HF_HOME=str(base / name / "hf"))
    add = ["model", "add", MODEL, f"hf://{HUB_REPO}", *(a for g in include for a in ("--include", g))]
    for argv in (add, ["fetch", "--model", MODEL]):
        proc = subprocess.run([sys.executable, str(REPO / "tools" / "pin.py"), *argv], cwd=REPO, env=pin_env,
                              capture_output=True, text=True, check=False)
        assert proc.returncode == 0, f"pin.py {' '.join(argv)}: {proc.stdout}{proc.stderr}"
    model_dir = cache / "models" / MODEL
    files = manifest(model_dir)
    publish_blobs(base, (model_dir / f.path for f in files))
    return Variant(lock, cache / "models", {f.path: model_dir / f.path for f in files})


def edit_json(path: Path, **changes: Any) -> None:
    doc = json.loads(path.read_text())
    doc.update(changes)
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


# --- the session ----------------------------------------------------------------------------------


def lab(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / "lab.py"), *args, "-i", str(HOSTS_FILE)],
        cwd=REPO, env=env(), capture_output=True, text=True, check=False,
    )


# --- sites: the control node's upstream and each site's WAN link ----------------------------------

#: site -> (the control node's address on the site's bridge, the bridge)
SITES = {"site-a": ("10.213.1.1", "llmf1"), "site-b": ("10.213.2.1", "llmf2")}
SITE_HOSTS = {"site-a": ("fl1", "fl2", "fl3"), "site-b": ("fl4",)}
MIRRORS = {"site-a": "fl1", "site-b": "fl4"}
UPSTREAM_PORT = 8091
WAN_CHAIN = "LLMFLEET-TEST-WAN"


class Wan:
    """Byte counters of each site's link to the control node (iptables, in a chain of the test's own):
    everything the control node sends over the site's bridge, and what of it the upstream served."""

    def __init__(self) -> None:
        self._ipt("-N", WAN_CHAIN, check=False)
        self._ipt("-F", WAN_CHAIN)
        if self._ipt("-C", "OUTPUT", "-j", WAN_CHAIN, check=False).returncode != 0:
            self._ipt("-I", "OUTPUT", "-j", WAN_CHAIN)
        for _, bridge in SITES.values():
            self._ipt("-A", WAN_CHAIN, "-o", bridge, "-p", "tcp", "--sport", str(UPSTREAM_PORT))
            self._ipt("-A", WAN_CHAIN, "-o", bridge)

    @staticmethod
    def _ipt(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["iptables", "-w", *args], capture_output=True, text=True, check=check)

    def reset(self) -> None:
        self._ipt("-Z", WAN_CHAIN)

    def read(self) -> dict[str, dict[str, int]]:
        """site -> {upstream: bytes the upstream sent, total: every byte the control node sent}."""
        rows = self._ipt("-L", WAN_CHAIN, "-v", "-x", "-n").stdout.splitlines()[2:]
        out = {site: {"upstream": 0, "total": 0} for site in SITES}
        bridges = {b: s for s, (_, b) in SITES.items()}
        for line in rows:
            fields = line.split()  # pkts bytes [target] prot opt in out source destination [match]: no target here
            site = next(bridges[f] for f in fields if f in bridges)
            # the first rule counts the upstream's packets, the second every packet (the upstream's too)
            out[site]["upstream" if f"spt:{UPSTREAM_PORT}" in line else "total"] += int(fields[1])
        return out

    def close(self) -> None:
        self._ipt("-D", "OUTPUT", "-j", WAN_CHAIN, check=False)
        self._ipt("-F", WAN_CHAIN, check=False)
        self._ipt("-X", WAN_CHAIN, check=False)


@dataclass
class Sites:
    wan: Wan
    upstream: subprocess.Popen[str]
    blobs: Path  # what the upstream serves besides the cache: <blobs>/blobs/sha256/<sha256>


SITES_STATE: dict[str, Sites] = {}


def start_upstream(scratch: Path) -> subprocess.Popen[str]:
    """tools/pin.py serve on the control node's address in each site: the cache, and the test's own blobs."""
    (scratch / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, str(REPO / "tools" / "pin.py"), "serve", "--root", str(CACHE), "--root", str(scratch)]
    for address, _ in SITES.values():
        argv += ["--bind", f"{address}:{UPSTREAM_PORT}"]
    proc = subprocess.Popen(argv, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "serving" not in line:
        proc.kill()
        pytest.fail(f"tools/pin.py serve did not start: {line}{proc.stdout.read()}", pytrace=False)
    return proc


@pytest.fixture(scope="session")
def fleet(scratch: Path) -> Generator[Run, None, None]:
    """The four hosts booted fresh and rolled out once (every host in one batch: the first install).
    Beside them: the upstream that fills the two sites' mirrors, and each site's WAN counters."""
    if os.geteuid() != 0:
        pytest.skip("the lab fleet needs root (systemd-nspawn, network namespaces)")
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    up = lab("up", "--fresh")
    if up.returncode != 0:
        pytest.fail(f"tools/lab.py up failed:\n{up.stdout}\n{up.stderr}", pytrace=False)
    wan = Wan()
    upstream = start_upstream(scratch)
    SITES_STATE["sites"] = Sites(wan, upstream, scratch)
    try:
        first = playbook("site.yml", "-e", '{"rollout_batches": ["100%"]}')
        if first.rc != 0:
            pytest.fail(f"the first rollout of the fleet failed:\n{first.failures()}", pytrace=False)
        FIGURES["first rollout, 4 hosts in one batch (mirrors filled, runtime built from them), s"] = round(first.wall_s, 1)
        FIGURES["first rollout, bytes the upstream sent per site (runtime wheels + model)"] = {
            s: c["upstream"] for s, c in wan.read().items()
        }
        yield first
    finally:
        upstream.terminate()
        upstream.wait(timeout=30)
        wan.close()
        down = lab("destroy")  # the fleet's machine roots too: the next session boots fresh ones
        if down.returncode != 0:
            print(f"tools/lab.py destroy failed:\n{down.stdout}\n{down.stderr}", file=sys.stderr)


def sites() -> Sites:
    return SITES_STATE["sites"]


@pytest.fixture(scope="session")
def hub() -> Generator[TestHub, None, None]:
    """The project's test hub on loopback: new model revisions are published here and pinned from it."""
    with TestHub() as h:
        yield h


@pytest.fixture(scope="session")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fleet")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not FIGURES:
        return
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "figures.json").write_text(json.dumps(FIGURES, indent=2) + "\n")
    terminalreporter.section("lab fleet figures")
    width = max(len(k) for k in FIGURES)
    for key, value in FIGURES.items():
        terminalreporter.write_line(f"{key:<{width}}  {value}")
    terminalreporter.write_line(f"(written to {OUT / 'figures.json'})")


def assert_serving(hosts: Sequence[str], generation: dict[str, str] | str) -> None:
    for host in hosts:
        want = generation if isinstance(generation, str) else generation[host]
        assert current(host) == want, f"{host} runs {current(host)}, expected {want}"
        assert health(host) == 200, f"{host} does not answer /health with 200"


@dataclass(frozen=True)
class Served:
    """The process systemd runs for an instance: what a switch or a rollback has to replace."""

    pid: int
    #: when systemd started it, CLOCK_MONOTONIC seconds: the lab hosts are containers on the control
    #: node's kernel, so this compares with ``time.monotonic()`` taken here
    started: float
    #: systemd's NRestarts: starts it made on its own (``Restart=always`` after an exit) since the
    #: unit was last reset (``systemctl reset-failed``, which a switch and a rollback run first)
    restarts: int
    argv: list[str]


def served_process(host: str, instance: str = "tiny") -> Served:
    unit = f"llmfleet-vllm@{instance}.service"
    props = dict(
        line.split("=", 1)
        for line in ssh(host, f"systemctl show -p MainPID -p ExecMainStartTimestampMonotonic -p NRestarts -- {unit}").splitlines()
        if "=" in line
    )
    pid = int(props["MainPID"])
    assert pid > 0, f"{unit} on {host} has no main process: {props}"
    argv = ssh(host, f"cat /proc/{pid}/cmdline").split("\0")
    if argv[-1:] == [""]:
        argv.pop()
    return Served(pid, int(props["ExecMainStartTimestampMonotonic"]) / 1e6, int(props["NRestarts"]), argv)


def assert_restarted_into(host: str, plan: dict[str, Any], before: Served, began: float, watch: Downtime) -> Served:
    """What the host serves now is the plan's generation, from a process started after ``began``
    (not ``before``, the one that served when the run began), and the poller saw it go and come back."""
    inst = plan["instances"][0]
    after = served_process(host, inst["name"])
    gen = plan["generation"]
    assert after.argv == inst["argv"], f"{host}'s {inst['unit']} runs {after.argv}, not generation {gen}'s argv {inst['argv']}"
    want_root = plan["models"][inst["model"]]["store_path"]
    assert served_root(host) == want_root, f"{host} serves {served_root(host)}, not generation {gen}'s model {want_root}"
    assert after.pid != before.pid, f"{host} still runs process {before.pid}, which served before the run"
    assert after.started > began, f"{host}'s process {after.pid} started {began - after.started:.1f} s before the run began"
    assert watch.restarted, f"the /health poller of {host} never saw the instance go down and come back: {watch.events}"
    return after
