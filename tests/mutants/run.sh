#!/usr/bin/env bash
# Run a test command against a copy of the committed tree with mutants applied: small deliberate
# breakages of the product (tests/mutants/<name>.patch) that a test must catch. The copy is a
# detached git worktree of HEAD in a temporary folder, removed afterwards; this checkout is never
# changed. See tests/mutants/README.md for each mutant and the test that catches it.
#
#   tests/mutants/run.sh [--expect caught|survived] [--tests-from REV [--keep PATH]...] MUTANT[,MUTANT...]|none -- COMMAND...
#
#   --expect caught     exit 0 when COMMAND fails (the mutant is caught), 1 when it passes
#   --expect survived   the other way round (to show that an older test let the mutant through)
#   --tests-from REV    take tests/ (except tests/mutants) as it was at REV, e.g. main before a test
#                       was strengthened: files added since are removed
#   --keep PATH         with --tests-from: keep HEAD's PATH (repeatable), e.g. tests/fixtures when
#                       the product's data changed with it
#   none                no mutant: the same command on the unchanged tree
#
# COMMAND runs in the copy's root, with .venv linked to this checkout's (and .lab to
# $LLMFLEET_LAB_DIR when set), e.g.:
#   LLMFLEET_LAB_DIR=$PWD/.lab tests/mutants/run.sh --expect caught manual-rollback-relinks-only -- \
#     .venv/bin/python -m pytest tests/fleet -m fleet -k 'first_rollout or good_pin or manual_rollback'
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(git -C "$here" rev-parse --show-toplevel)"
expect="" tests_from="" keep=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --expect) expect="$2"; shift 2 ;;
    --tests-from) tests_from="$2"; shift 2 ;;
    --keep) keep+=("$2"); shift 2 ;;
    -h|--help) sed -n '2,20p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) break ;;
  esac
done
if [[ $# -lt 3 || "$2" != "--" ]]; then
  echo "usage: tests/mutants/run.sh [--expect caught|survived] [--tests-from REV [--keep PATH]...] MUTANT[,MUTANT...]|none -- COMMAND..." >&2
  echo "mutants: $(cd "$here" && ls -1 ./*.patch | sed 's|^\./||; s|\.patch$||' | tr '\n' ' ')" >&2
  exit 2
fi
if [[ -n "$expect" && "$expect" != caught && "$expect" != survived ]]; then
  echo "--expect $expect: expected caught or survived" >&2
  exit 2
fi
IFS=, read -r -a mutants <<<"$1"
shift 2

work="$(mktemp -d /tmp/llmfleet-mutant.XXXXXX)"
tree="$work/tree"
cleanup() {
  git -C "$repo" worktree remove --force "$tree" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
git -C "$repo" worktree add --detach --quiet "$tree" HEAD
ln -s "$repo/.venv" "$tree/.venv"
# tools/lab.py keeps its hosts in <repo>/.lab while Ansible and the tests read $LLMFLEET_LAB_DIR:
# the copy's .lab is that folder, so both mean the same hosts (and the shared lab stays the one lab)
if [[ -n "${LLMFLEET_LAB_DIR:-}" ]]; then
  mkdir -p "$LLMFLEET_LAB_DIR"
  ln -s "$(realpath "$LLMFLEET_LAB_DIR")" "$tree/.lab"
fi
if [[ -n "$tests_from" ]]; then
  git -C "$tree" diff --name-only --diff-filter=A -z "$tests_from" HEAD -- tests | (cd "$tree" && xargs -0 -r rm -f --)
  git -C "$tree" checkout --quiet "$tests_from" -- tests
  git -C "$tree" checkout --quiet HEAD -- tests/mutants "${keep[@]}"
  kept_note=""
  [[ ${#keep[@]} -gt 0 ]] && kept_note=", but ${keep[*]} as at HEAD"
  echo "tests/ as at $tests_from ($(git -C "$repo" rev-parse --short "$tests_from"))$kept_note"
fi
for m in "${mutants[@]}"; do
  [[ "$m" == none ]] && continue
  patch="$here/$m.patch"
  if [[ ! -f "$patch" ]]; then
    echo "no mutant $m ($patch)" >&2
    exit 2
  fi
  if ! git -C "$tree" apply "$patch"; then
    echo "mutant $m no longer applies to HEAD: update $patch" >&2
    exit 2
  fi
  echo "applied mutant $m"
done
echo "tree: HEAD $(git -C "$repo" rev-parse --short HEAD) + ${mutants[*]}; running: $*"

set +e
(cd "$tree" && "$@")
rc=$?
set -e
echo "mutant(s) ${mutants[*]}: the command exited $rc"
if [[ -d "$tree/out" ]]; then  # the run's logs (out/fleet/runs/...) outlive the copy
  kept="$repo/out/mutants/$(date +%Y%m%d-%H%M%S)-$(IFS=+; echo "${mutants[*]}")"
  mkdir -p "$kept" && cp -a "$tree/out/." "$kept/" && echo "its out/ is kept in $kept"
fi
case "$expect" in
  caught) if [[ $rc -ne 0 ]]; then echo "CAUGHT"; exit 0; else echo "SURVIVED (expected caught)"; exit 1; fi ;;
  survived) if [[ $rc -eq 0 ]]; then echo "SURVIVED (as expected)"; exit 0; else echo "CAUGHT (expected survived)"; exit 1; fi ;;
  *) exit "$rc" ;;
esac
