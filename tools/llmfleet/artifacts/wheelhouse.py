"""Runtimes as hash-locked wheel sets: resolve once, fetch exactly that set everywhere else.

*Resolve* (``pin.py runtime``) asks pip for the complete wheel set of one distribution for a
target Python and platform, then has ``uv pip compile`` turn that folder into the lock, leaving
out what must not be installed. Or, for runtimes too large to download on the control node,
``uv pip compile`` against the index alone: it reads metadata, and the index gives each wheel's
sha256 and size. Both write ``pylock.toml`` (PEP 751), which names every wheel file with its hash,
so the lock records the file a target installs, not only a version.

*Fetch* (``pin.py fetch``, what CI and a fresh checkout run) never resolves: it copies locked
files from local folders or has pip download exactly ``name==version --hash=...`` with
``--no-deps``, and keeps a file only if its sha256 and size match the lock.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from urllib.parse import unquote, urlsplit

from packaging.tags import Tag, compatible_tags, cpython_tags
from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename

from ..errors import LlmfleetError
from ..pins import Requirement, RuntimePin
from .cache import MismatchError, check_dir, check_file, install_file

PLATFORM_RE = re.compile(r"^(?P<arch>x86_64|aarch64)-manylinux_2_(?P<glibc>\d+)$")
#: manylinux_2_N tags that also have a legacy name, which wheels still carry
LEGACY_MANYLINUX = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
OUTPUT_TAIL = 15
Log = Callable[[str], None]


class ResolveError(LlmfleetError):
    """A resolution or download step failed."""


@dataclass(frozen=True)
class Target:
    """Where a wheel set must install: CPython ``python`` on ``platform`` (uv's spelling)."""

    python: str  # "3.11"
    platform: str  # "x86_64-manylinux_2_36"

    def __post_init__(self) -> None:
        if not re.fullmatch(r"3\.\d+", self.python):
            raise ResolveError(f"python {self.python!r} is not a CPython 3.N version (e.g. 3.11)")
        if not PLATFORM_RE.match(self.platform):
            raise ResolveError(f"platform {self.platform!r} is not supported (valid: x86_64-manylinux_2_N or aarch64-manylinux_2_N)")

    @property
    def arch(self) -> str:
        return self.platform.split("-", 1)[0]

    @property
    def abi(self) -> str:
        return "cp" + self.python.replace(".", "")

    @cached_property
    def platform_tags(self) -> list[str]:
        """Every manylinux tag the target accepts, best first, legacy names beside their twins.

        pip's ``--platform`` accepts exactly the tags it is given: it does not add the older
        manylinux tags a newer glibc also runs, so all of them are spelled out.
        """
        match = PLATFORM_RE.match(self.platform)
        assert match is not None
        lowest = 5 if self.arch == "x86_64" else 17
        tags = []
        for minor in range(int(match["glibc"]), lowest - 1, -1):
            tags.append(f"manylinux_2_{minor}_{self.arch}")
            if minor in LEGACY_MANYLINUX and (self.arch == "x86_64" or minor == 17):
                tags.append(f"{LEGACY_MANYLINUX[minor]}_{self.arch}")
        return tags

    @cached_property
    def tags(self) -> dict[Tag, int]:
        """Supported wheel tags -> preference rank (0 is best), as pip orders them."""
        version = tuple(int(p) for p in self.python.split("."))
        ordered = list(cpython_tags(version, abis=[self.abi], platforms=self.platform_tags))
        ordered += compatible_tags(version, interpreter=self.abi, platforms=self.platform_tags)
        ranks: dict[Tag, int] = {}
        for i, tag in enumerate(ordered):
            ranks.setdefault(tag, i)
        return ranks

    def pip_args(self) -> list[str]:
        """pip download flags that select wheels for this target from any interpreter."""
        args = ["--only-binary=:all:", "--python-version", self.python, "--implementation", "cp", "--abi", self.abi]
        for tag in self.platform_tags:
            args += ["--platform", tag]
        return args

    def rank(self, filename: str) -> tuple[int, int] | None:
        """pip's preference among wheels of one version (lower is better), None if unusable."""
        try:
            _, _, build, tags = parse_wheel_filename(filename)
        except InvalidWheelFilename:
            return None
        ranks = [self.tags[t] for t in tags if t in self.tags]
        if not ranks:
            return None
        return min(ranks), -(build[0] if build else -1)


@dataclass
class RuntimeInputs:
    """What a resolution starts from (the inputs of a runtime pin, not its result)."""

    distribution: str
    version: str
    python: str
    platform: str
    excluded: list[str] = field(default_factory=list)
    constraints: list[str] = field(default_factory=list)

    @property
    def target(self) -> Target:
        return Target(self.python, self.platform)


# --- external tools ------------------------------------------------------------------------


def _run(cmd: Sequence[str], what: str) -> str:
    """Run a tool; on failure raise one message with the command's last lines of output."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise ResolveError(f"{what}: {cmd[0]} not found") from exc
    if proc.returncode != 0:
        output = proc.stdout + proc.stderr
        if mismatches := _pip_hash_mismatches(output):
            raise MismatchError(f"{what}: the index serves other content than the lock pins: " + "; ".join(mismatches))
        lines = output.strip().splitlines()[-OUTPUT_TAIL:]
        raise ResolveError(f"{what} failed (exit {proc.returncode}):\n  " + "\n  ".join(lines))
    return proc.stdout


def _pip_hash_mismatches(output: str) -> list[str]:
    """pip's hash-mismatch report as ``name==version: sha256 <got> != pinned <expected>`` items."""
    found = re.findall(r"^\s*(\S+==\S+) from .*?\n\s*Expected sha256 (\w+)\n\s*Got\s+(\w+)", output, flags=re.MULTILINE)
    return [f"{req}: sha256 {got} != pinned {expected}" for req, expected, got in found]


def uv_binary() -> str:
    """``uv`` next to this interpreter (the control venv), else on PATH."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    found = shutil.which("uv", path=path)
    if not found:
        raise ResolveError("uv not found: install the control venv (requirements/control.txt) or put uv on PATH")
    return found


def _has_pip(python: str) -> bool:
    return subprocess.run([python, "-m", "pip", "--version"], capture_output=True, check=False).returncode == 0


def pip_python(version: str, explicit: str | None = None) -> tuple[str, bool]:
    """An interpreter to run pip with: (path, whether it is the target's own Python version).

    pip evaluates environment markers (``python_version > "3.11"``) with the interpreter that
    runs it, whatever ``--python-version`` says, so a Python of the target version is
    preferred: ``python3.11`` on PATH, then pyenv's newest 3.11.x. Otherwise this interpreter.
    """
    if explicit:
        if not _has_pip(explicit):
            raise ResolveError(f"--pip-python {explicit}: cannot run '{explicit} -m pip'")
        return explicit, True
    candidates = [shutil.which(f"python{version}")]
    pyenv = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv") / "versions"
    candidates += sorted(glob.glob(str(pyenv / f"{version}.*" / "bin" / "python")), key=_version_key, reverse=True)
    for c in candidates:
        if c and _has_pip(c):
            return c, True
    return sys.executable, sys.version_info[:2] == tuple(int(p) for p in version.split("."))


def _version_key(path: str | None) -> tuple[int, ...]:
    name = Path(path or "").parents[1].name
    return tuple(int(p) for p in re.findall(r"\d+", name))


# --- resolution ----------------------------------------------------------------------------


def compile_lock(inputs: RuntimeInputs, workdir: Path, find_links: Path | None = None) -> list[Requirement]:
    """``uv pip compile`` of ``distribution==version`` for the target, as a list of requirements.

    With ``find_links`` it resolves offline from that folder only (the wheels pip downloaded);
    without, it asks the index and downloads no wheel (uv reads metadata; the index gives hashes).
    """
    target = inputs.target
    (workdir / "requirements.in").write_text(f"{inputs.distribution}=={inputs.version}\n")
    out = workdir / "pylock.toml"
    cmd = [
        uv_binary(), "pip", "compile", str(workdir / "requirements.in"), "--output-file", str(out), "--format", "pylock.toml",
        "--python-version", inputs.python, "--python-platform", inputs.platform, "--only-binary", ":all:", "--quiet",
    ]  # fmt: skip
    if inputs.excluded:
        (workdir / "excludes.txt").write_text("".join(f"{name}\n" for name in inputs.excluded))
        cmd += ["--excludes", str(workdir / "excludes.txt")]
    if inputs.constraints:
        (workdir / "constraints.txt").write_text("".join(f"{c}\n" for c in inputs.constraints))
        cmd += ["--constraint", str(workdir / "constraints.txt")]
    if find_links is not None:
        cmd += ["--offline", "--no-index", "--find-links", str(find_links)]
    _run(cmd, "uv pip compile")
    return requirements_from_pylock(out.read_text(), target, local=find_links)


def requirements_from_pylock(text: str, target: Target, local: Path | None = None) -> list[Requirement]:
    """The wheel each package of a pylock.toml installs on ``target``, with its hash and size."""
    data = tomllib.loads(text)
    reqs = []
    for pkg in data.get("packages", []):
        name, version = canonicalize_name(pkg["name"]), pkg["version"]
        best: tuple[tuple[int, int], str, dict[str, object]] | None = None
        for wheel in pkg.get("wheels", []):
            filename = wheel.get("name") or unquote(Path(urlsplit(wheel.get("url") or wheel.get("path", "")).path).name)
            rank = target.rank(filename)
            if rank is not None and (best is None or rank < best[0]):
                best = (rank, filename, wheel)
        if best is None:
            raise ResolveError(f"{name}=={version}: no wheel for cp{target.python.replace('.', '')} on {target.platform}")
        _, filename, wheel = best
        hashes = wheel.get("hashes")
        sha256 = hashes.get("sha256") if isinstance(hashes, dict) else None
        if not isinstance(sha256, str):
            raise ResolveError(f"{filename}: the resolver gave no sha256")
        size = wheel.get("size")
        if local is not None:
            size = (local / filename).stat().st_size
        reqs.append(Requirement(name=name, version=version, filename=filename, sha256=sha256, size=size if isinstance(size, int) else None))
    if not reqs:
        raise ResolveError("the resolver returned no packages")
    return sorted(reqs, key=lambda r: r.name)


def resolve_by_download(
    inputs: RuntimeInputs, wheelhouse: Path, *, find_links: Iterable[Path] = (), pip: str | None = None, log: Log = print
) -> list[Requirement]:
    """Download the full wheel set with pip, lock it with uv, and fill ``wheelhouse`` with it."""
    target = inputs.target
    python, native = pip_python(inputs.python, pip)
    if not native:
        log(f"note: pip runs on Python {sys.version_info[0]}.{sys.version_info[1]}, not {inputs.python}: markers are judged for it")
    wheelhouse.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=wheelhouse.parent, prefix=f".resolve-{wheelhouse.name}."))
    try:
        downloads = work / "wheels"
        cmd = [python, "-m", "pip", "download", "--dest", str(downloads), "--progress-bar", "off", *target.pip_args()]
        for d in find_links:
            cmd += ["--find-links", str(d)]
        cmd.append(f"{inputs.distribution}=={inputs.version}")
        log(f"pip download {inputs.distribution}=={inputs.version} for CPython {inputs.python} on {inputs.platform} (with {python})")
        _run(cmd, "pip download")
        reqs = compile_lock(inputs, work, find_links=downloads)
        fill_wheelhouse(reqs, wheelhouse, sources=[downloads], move=True, log=log)
        return reqs
    finally:
        shutil.rmtree(work, ignore_errors=True)


def resolve_by_index(inputs: RuntimeInputs) -> list[Requirement]:
    """Lock from index metadata only: nothing is downloaded."""
    with tempfile.TemporaryDirectory(prefix="llmfleet-resolve.") as work:
        return compile_lock(inputs, Path(work))


# --- fetch ---------------------------------------------------------------------------------


def requirements_file(reqs: Iterable[Requirement]) -> str:
    """pip's hash-checking requirements text: one ``name==version --hash=sha256:...`` per line."""
    return "".join(r.line() + "\n" for r in sorted(reqs, key=lambda r: r.name))


@dataclass
class FetchReport:
    present: int = 0
    copied: int = 0
    downloaded: int = 0
    removed: list[str] = field(default_factory=list)
    nbytes: int = 0


def fill_wheelhouse(
    reqs: Sequence[Requirement],
    wheelhouse: Path,
    *,
    target: Target | None = None,
    sources: Sequence[Path] = (),
    move: bool = False,
    log: Log = print,
) -> FetchReport:
    """Make ``wheelhouse`` hold exactly ``reqs``' files, each verified against its sha256 and size.

    Files already present and correct stay; others are taken from ``sources`` (folders holding
    files by their locked names), then downloaded by pip (``target`` needed), ``--no-deps
    --require-hashes``: exactly the locked files, no resolution. Files not in the lock go.
    """
    report = FetchReport()
    wheelhouse.mkdir(parents=True, exist_ok=True)
    missing = []
    for req in reqs:
        if not req.filename:
            raise ResolveError(f"{req.name}=={req.version}: the lock names no file: pin this runtime again")
        dst = wheelhouse / req.filename
        report.nbytes += req.size or 0
        if dst.exists() and check_file(dst, req.sha256, req.size) is None:
            report.present += 1
            continue
        src = next((d / req.filename for d in sources if (d / req.filename).is_file()), None)
        if src is not None:
            try:
                install_file(src, dst, req.sha256, req.size, move=move)
                report.copied += 1
                continue
            except MismatchError as exc:
                log(f"warning: {exc}; downloading it instead")
        missing.append(req)
    if missing:
        if target is None:
            raise ResolveError(
                f"{len(missing)} locked wheel(s) are in no source folder: {', '.join(r.filename or r.name for r in missing[:5])}"
            )
        _download(missing, wheelhouse, target, log)
        report.downloaded += len(missing)
    wanted = {r.filename for r in reqs}
    for extra in sorted(p for p in wheelhouse.iterdir() if p.name not in wanted):
        report.removed.append(extra.name)
        shutil.rmtree(extra) if extra.is_dir() else extra.unlink()
    return report


def _download(reqs: Sequence[Requirement], wheelhouse: Path, target: Target, log: Log) -> None:
    size = sum(r.size or 0 for r in reqs)
    log(f"downloading {len(reqs)} locked wheel(s), {size / 1e6:.0f} MB, with pip (--no-deps --require-hashes)")
    with tempfile.TemporaryDirectory(dir=wheelhouse.parent, prefix=f".fetch-{wheelhouse.name}.") as work:
        req_file = Path(work) / "requirements.txt"
        req_file.write_text(requirements_file(reqs))
        dest = Path(work) / "wheels"
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes", "--dest", str(dest), "--progress-bar", "off"]
        _run([*cmd, *target.pip_args(), "-r", str(req_file)], "pip download")
        by_name = {p.name: p for p in dest.iterdir()}
        for req in reqs:
            assert req.filename is not None
            src = by_name.get(req.filename)
            if src is None:
                raise MismatchError(f"pip did not download {req.filename} (got: {', '.join(sorted(by_name)) or 'nothing'})")
            install_file(src, wheelhouse / req.filename, req.sha256, req.size, move=True)


def check_wheelhouse(pin: RuntimePin, wheelhouse: Path) -> list[str]:
    """Every way ``wheelhouse`` differs from the pin's locked files: wrong, missing, unexpected."""
    return check_dir(wheelhouse, {r.filename or r.name: (r.sha256, r.size) for r in pin.requirements or []})
