#!/bin/sh
# Install the carried wheels of the vllm-0.26.0-cu130 runtime on the GPU machine.
#
#   sh bench/gpu/install.sh PIECES_DIR LOCK TARGET
#
# PIECES_DIR holds piece-00, piece-01, ... (bench/gpu/prepare.py pieces: one tar of the wheels the
# machine's image lacks, with SHA256SUMS). The pieces are joined, every wheel's sha256 is checked
# against SHA256SUMS and against the runtime pin in LOCK (pins/lock.json), then the wheels are
# installed with pip --no-deps into TARGET (put it first on PYTHONPATH). The image's own torch must
# be the pin's (2.11.0, CUDA 13.0): checked before anything is installed.
set -eu
pieces=$1 lock=$2 target=$3
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 - "$lock" <<'PY'
import json, sys, torch
pin = json.load(open(sys.argv[1]))["runtimes"]["vllm-0.26.0-cu130"]
want = {r["name"]: r["version"] for r in pin["requirements"]}["torch"]
have = torch.__version__.split("+")[0]
if have != want or not (torch.version.cuda or "").startswith("13.0"):
    sys.exit(f"install: the image has torch {torch.__version__} (CUDA {torch.version.cuda}); the pin needs torch {want} for CUDA 13.0")
print(f"install: torch {torch.__version__} (CUDA {torch.version.cuda}) is the pin's")
PY
cat "$pieces"/piece-* > "$work/wheels.tar"
tar -C "$work" -xf "$work/wheels.tar"
(cd "$work" && sha256sum -c --quiet SHA256SUMS)
python3 - "$lock" "$work/SHA256SUMS" <<'PY'
import json, sys
pin = json.load(open(sys.argv[1]))["runtimes"]["vllm-0.26.0-cu130"]
locked = {r["filename"]: r["sha256"] for r in pin["requirements"]}
for line in open(sys.argv[2]):
    digest, name = line.split()
    if locked.get(name) != digest:
        sys.exit(f"install: {name} is not the locked file (sha256 {digest}, lock {locked.get(name)})")
print(f"install: every carried wheel is a locked file of vllm-0.26.0-cu130")
PY
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$target" "$work"/*.whl
echo "install: $(ls "$work"/*.whl | wc -l) wheels in $target"
