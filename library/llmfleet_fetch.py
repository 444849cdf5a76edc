#!/usr/bin/python
"""llmfleet_fetch: download one pinned file over HTTP, resuming a broken transfer, checked before it is visible."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: llmfleet_fetch
short_description: Download a pinned file, resume a broken transfer, install it only when its size and sha256 match
description:
  - Downloads I(url) into C(<dest>.part), asking with C(Range) for what is missing when an earlier transfer broke
    off (a server that ignores C(Range) and answers 200 is read from the start), retrying a dropped connection
    up to I(retries) times.
  - When the part file holds I(size) bytes with sha256 I(sha256), renames it to I(dest); otherwise the part file is
    deleted and the task fails with both sums. A I(dest) that already matches is left alone (not changed).
  - With I(files), many files in one task, one after another (a site mirror's blobs, a runtime's wheels).
  - Runs on the managed host with the Python standard library (and Ansible's C(open_url)). Check mode reports
    whether a download is needed and downloads nothing.
version_added: "0.2.0"
author: llmfleet
options:
  url:
    description: The file's URL (http or https). With I(dest), I(sha256), I(size); or give I(files).
    type: str
  dest:
    description: Absolute path of the file to create; its directory is created.
    type: path
  sha256:
    description: The pinned sha256, 64 lowercase hex digits.
    type: str
  size:
    description: The pinned size in bytes.
    type: int
  files:
    description: Several files, each C({url, dest, sha256, size}).
    type: list
    elements: dict
  blobs:
    description:
      - Several files from a content-addressed server (a site mirror, C(tools/pin.py serve)), each C({sha256, size})
        and optionally the name to store it under (C(path), C(filename) or C(name); default the sha256). Each comes
        from C(<base_url>/sha256/<sha256>) and goes to C(<blob_dir>/<name>).
    type: list
    elements: dict
  base_url:
    description: With I(blobs), the server's base URL; empty fails the task when a blob is missing, naming them.
    type: str
  blob_dir:
    description: With I(blobs), the folder the blobs go to.
    type: path
  name_by:
    description: With I(blobs), C(given) stores a blob under its C(path)/C(filename)/C(name), C(sha256) under its sha256.
    type: str
    choices: [given, sha256]
    default: given
  existing:
    description:
      - How a I(dest) that already exists is trusted. C(checksum) hashes it (a file of the right size with other
        content is downloaded again); C(size) trusts a file of the pinned size without reading it (a store whose files
        were checked when they arrived, and are checked on their own schedule).
    type: str
    choices: [checksum, size]
    default: checksum
  timeout:
    description: Seconds a connection may stall before it counts as broken.
    type: int
    default: 60
  retries:
    description: Times a broken transfer is resumed within one task.
    type: int
    default: 3
  mode:
    description: Mode of the installed file.
    type: str
    default: "0644"
"""

EXAMPLES = r"""
- name: Download a model file from the site mirror
  llmfleet_fetch:
    url: http://mirror.site-a.lan:8090/sha256/0f3c...
    dest: /var/lib/llmfleet/store/abc-tiny-llama.partial/model.safetensors
    sha256: 0f3c...
    size: 2906408

- name: Fill a mirror from upstream, trusting blobs already there by size
  llmfleet_fetch:
    files: "{{ blobs }}"   # [{url, dest, sha256, size}, ...]
    existing: size
"""

RETURN = r"""
resumed_from:
  description: Bytes already in part files when the task started (0 for fresh transfers).
  returned: always
  type: int
received:
  description: Bytes received from the server by this task.
  returned: always
  type: int
attempts:
  description: HTTP requests made (more than one per file when a transfer broke off and was resumed).
  returned: always
  type: int
fetched:
  description: Files downloaded by this task.
  returned: always
  type: int
present:
  description: Files that were already in place.
  returned: always
  type: int
"""

import hashlib  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402

from ansible.module_utils.basic import AnsibleModule  # noqa: E402
from ansible.module_utils.urls import open_url  # noqa: E402

CHUNK = 1 << 20


class FetchError(Exception):
    pass


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(CHUNK)
            if not block:
                return h.hexdigest()
            h.update(block)


def matches(path: str, sha256: str, size: int) -> bool:
    return os.path.isfile(path) and os.path.getsize(path) == size and sha256_file(path) == sha256


def transfer(url: str, part: str, size: int, timeout: int, retries: int, opener=open_url):
    """Fill ``part`` up to ``size`` bytes from ``url``; returns (resumed_from, received, attempts)."""
    have = os.path.getsize(part) if os.path.exists(part) else 0
    if have > size:  # not a prefix of the pinned file
        os.unlink(part)
        have = 0
    resumed_from, received, attempts, last_error = have, 0, 0, None
    while have < size and attempts <= retries:
        attempts += 1
        headers = {"Range": f"bytes={have}-"} if have else {}
        try:
            response = opener(url, headers=headers, timeout=timeout, follow_redirects="safe")
            status = response.getcode()
            if have and status == 200:  # the server ignored Range: start over
                have = 0
            elif have and status != 206:
                raise FetchError(f"{url} answered HTTP {status} to a ranged request")
            with open(part, "ab" if have else "wb") as f:
                while True:
                    block = response.read(CHUNK)
                    if not block:
                        break
                    f.write(block)
                    have += len(block)
                    received += len(block)
                    if have > size:
                        break
            last_error = None
        except FetchError:
            raise
        except Exception as exc:  # a dropped connection, a timeout: resume from what is on disk
            last_error = exc
            have = os.path.getsize(part) if os.path.exists(part) else 0
            code = getattr(exc, "code", None)
            if code is not None and code < 500 and code != 408 and code != 429:
                raise FetchError(f"{url}: HTTP {code} {getattr(exc, 'reason', '')}".rstrip()) from exc
    if have < size and last_error is not None:
        raise FetchError(
            f"{url}: the transfer broke off at {have} of {size} bytes after {attempts} attempts ({last_error}); "
            "the part file is kept and the next run resumes it"
        )
    return resumed_from, received, attempts


def blob_specs(blobs: list, base_url: str, blob_dir: str, by_sha256: bool = False) -> list:
    """{url, dest, sha256, size} for each blob: from <base_url>/sha256/<sha256> to <blob_dir>/<name>."""
    base = base_url.rstrip("/") or "http://no-base-url.invalid"
    out = []
    for b in blobs:
        name = b.get("sha256") if by_sha256 else (b.get("path") or b.get("filename") or b.get("name") or b.get("sha256"))
        out.append({"url": f"{base}/sha256/{b.get('sha256')}", "dest": os.path.join(blob_dir, str(name)),
                    "sha256": b.get("sha256"), "size": b.get("size")})
    return out


def check_file(spec: dict) -> str | None:
    if not re.match(r"^[0-9a-f]{64}$", str(spec.get("sha256") or "")):
        return f"sha256 must be 64 lowercase hex digits, got {spec.get('sha256')!r}"
    if not re.match(r"^https?://", str(spec.get("url") or "")):
        return f"url must be http:// or https://, got {spec.get('url')!r}"
    dest = str(spec.get("dest") or "")
    if not dest.startswith("/") or "/../" in dest + "/" or "/./" in dest + "/":
        return f"dest must be an absolute path without . or .. parts, got {spec.get('dest')!r}"
    if not isinstance(spec.get("size"), int) or spec["size"] < 0:
        return f"size must be a whole number of bytes, got {spec.get('size')!r}"
    return None


def in_place(spec: dict, existing: str) -> bool:
    dest = spec["dest"]
    if existing == "size":
        return os.path.isfile(dest) and os.path.getsize(dest) == spec["size"]
    return matches(dest, spec["sha256"], spec["size"])


def fetch_one(spec: dict, timeout: int, retries: int, mode: str) -> tuple[int, int, int]:
    """Download, check and install one file; raises FetchError with a one-line reason."""
    dest, part = spec["dest"], spec["dest"] + ".part"
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    resumed_from, received, attempts = transfer(spec["url"], part, spec["size"], timeout, retries)
    size = os.path.getsize(part)
    actual = sha256_file(part) if size == spec["size"] else None
    if actual != spec["sha256"]:
        os.unlink(part)
        why = f"sha256 {actual} != pinned {spec['sha256']}" if actual else f"size {size} != pinned {spec['size']}"
        raise FetchError(f"{spec['url']}: {why}; the download was deleted and nothing of it is used")
    os.chmod(part, int(mode, 8))
    os.replace(part, dest)
    return resumed_from, received, attempts


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "url": {"type": "str"},
            "dest": {"type": "path"},
            "sha256": {"type": "str"},
            "size": {"type": "int"},
            "files": {"type": "list", "elements": "dict"},
            "blobs": {"type": "list", "elements": "dict"},
            "base_url": {"type": "str"},
            "blob_dir": {"type": "path"},
            "name_by": {"type": "str", "choices": ["given", "sha256"], "default": "given"},
            "existing": {"type": "str", "choices": ["checksum", "size"], "default": "checksum"},
            "timeout": {"type": "int", "default": 60},
            "retries": {"type": "int", "default": 3},
            "mode": {"type": "str", "default": "0644"},
        },
        mutually_exclusive=[("files", "url", "blobs")],
        required_one_of=[("files", "url", "blobs")],
        required_together=[("url", "dest", "sha256", "size")],
        required_by={"blobs": ("blob_dir",)},
        supports_check_mode=True,
    )
    p = module.params
    single = p["url"] is not None
    if p["blobs"] is not None:
        specs = blob_specs(p["blobs"], p["base_url"] or "", p["blob_dir"], p["name_by"] == "sha256")
    else:
        specs = [{k: p[k] for k in ("url", "dest", "sha256", "size")}] if single else p["files"]
    for spec in specs:
        problem = check_file(spec)
        if problem:
            module.fail_json(msg=problem)
    result = {"changed": False, "resumed_from": 0, "received": 0, "attempts": 0, "fetched": 0, "present": 0}
    if single:
        result["dest"] = p["dest"]
    todo = []
    for spec in specs:
        if in_place(spec, p["existing"]):
            result["present"] += 1
        else:
            todo.append(spec)
    result["changed"] = bool(todo)
    if p["blobs"] is not None and todo and not p["base_url"]:
        names = ", ".join(os.path.basename(s["dest"]) for s in todo[:5])
        module.fail_json(msg=f"{len(todo)} of {len(specs)} blob(s) are not in {p['blob_dir']} and no base_url is given to fetch "
                             f"them from: {names}{' …' if len(todo) > 5 else ''}", missing=[s["sha256"] for s in todo], **result)
    if module.check_mode or not todo:
        module.exit_json(**result)
    for spec in todo:
        try:
            resumed_from, received, attempts = fetch_one(spec, p["timeout"], p["retries"], p["mode"])
        except FetchError as exc:
            module.fail_json(msg=str(exc), **result)
        result["resumed_from"] += resumed_from
        result["received"] += received
        result["attempts"] += attempts
        result["fetched"] += 1
    module.exit_json(**result)


if __name__ == "__main__":
    main()
