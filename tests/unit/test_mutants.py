"""The mutants of tests/mutants (deliberate breakages a strengthened test must catch) still apply to
the tree, and each is listed in the README with the test that catches it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MUTANTS = REPO / "tests" / "mutants"
PATCHES = sorted(MUTANTS.glob("*.patch"))


def test_there_are_mutants_and_each_is_documented() -> None:
    readme = (MUTANTS / "README.md").read_text()
    assert PATCHES
    for patch in PATCHES:
        assert f"| `{patch.stem}` |" in readme, f"{patch.name} is not in tests/mutants/README.md"


def _git_apply_check(patch: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", "apply", "--check", *flags, str(patch)], cwd=REPO, capture_output=True, text=True, check=False)


@pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(), reason="needs git and a checkout")
@pytest.mark.parametrize("patch", PATCHES, ids=[p.stem for p in PATCHES])
def test_mutant_still_applies(patch: Path) -> None:
    """A patch that no longer applies is a test of nothing: update it with the code it breaks."""
    if any(_git_apply_check(p, "--reverse").returncode == 0 for p in PATCHES):
        pytest.skip("a mutant is applied in this tree (a copy made by tests/mutants/run.sh): the others may overlap it")
    done = _git_apply_check(patch)
    assert done.returncode == 0, done.stderr
    text = patch.read_text()
    assert "MUTANT" in text, f"{patch.name}: mark the changed lines with a MUTANT comment"
