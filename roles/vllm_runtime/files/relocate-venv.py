"""Rewrite a virtualenv's own path in its scripts: relocate-venv.py OLD NEW.

A venv bakes its absolute path into bin/ (shebangs, activate scripts) and pyvenv.cfg. The
runtime is built at <store>.partial and renamed to <store>; this rewrites OLD to NEW first.
Prints each file it changed. Binary files (with a NUL byte) and symlinks are left alone.
"""

import os
import sys


def main() -> int:
    old, new = sys.argv[1], sys.argv[2]
    b_old, b_new = os.fsencode(old), os.fsencode(new)
    bindir = os.path.join(old, "bin")
    paths = [os.path.join(bindir, name) for name in sorted(os.listdir(bindir))]
    paths.append(os.path.join(old, "pyvenv.cfg"))
    for path in paths:
        if os.path.islink(path) or not os.path.isfile(path):
            continue
        with open(path, "rb") as f:
            data = f.read()
        if b_old not in data or b"\0" in data:
            continue
        with open(path, "r+b") as f:
            f.write(data.replace(b_old, b_new))
            f.truncate()
        print(os.path.relpath(path, old))
    return 0


if __name__ == "__main__":
    sys.exit(main())
