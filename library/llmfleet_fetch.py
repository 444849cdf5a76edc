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
  - Runs on the managed host with the Python standard library (and Ansible's C(open_url)). Check mode reports
    whether a download is needed and downloads nothing.
version_added: "0.2.0"
author: llmfleet
options:
  url:
    description: The file's URL (http or https).
    type: str
    required: true
  dest:
    description: Absolute path of the file to create; its directory must exist.
    type: path
    required: true
  sha256:
    description: The pinned sha256, 64 lowercase hex digits.
    type: str
    required: true
  size:
    description: The pinned size in bytes.
    type: int
    required: true
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
    url: http://mirror.site-a.lan/models/tiny-llama/model.safetensors
    dest: /var/lib/llmfleet/store/abc-tiny-llama.partial/model.safetensors
    sha256: 0f3c...
    size: 2906408
"""

RETURN = r"""
resumed_from:
  description: Bytes already in the part file when the task started (0 for a fresh transfer).
  returned: always
  type: int
received:
  description: Bytes received from the server by this task.
  returned: always
  type: int
attempts:
  description: HTTP requests made (more than one when a transfer broke off and was resumed).
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


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "url": {"type": "str", "required": True},
            "dest": {"type": "path", "required": True},
            "sha256": {"type": "str", "required": True},
            "size": {"type": "int", "required": True},
            "timeout": {"type": "int", "default": 60},
            "retries": {"type": "int", "default": 3},
            "mode": {"type": "str", "default": "0644"},
        },
        supports_check_mode=True,
    )
    p = module.params
    if not re.match(r"^[0-9a-f]{64}$", p["sha256"]):
        module.fail_json(msg=f"sha256 must be 64 lowercase hex digits, got {p['sha256']!r}")
    if not re.match(r"^https?://", p["url"]):
        module.fail_json(msg=f"url must be http:// or https://, got {p['url']!r}")
    dest, part = p["dest"], p["dest"] + ".part"
    result = {"changed": False, "resumed_from": 0, "received": 0, "attempts": 0, "dest": dest}
    if matches(dest, p["sha256"], p["size"]):
        module.exit_json(**result)
    result["changed"] = True
    if module.check_mode:
        module.exit_json(**result)
    try:
        resumed_from, received, attempts = transfer(p["url"], part, p["size"], p["timeout"], p["retries"])
    except FetchError as exc:
        module.fail_json(msg=str(exc), **result)
    result.update(resumed_from=resumed_from, received=received, attempts=attempts)
    size = os.path.getsize(part)
    actual = sha256_file(part) if size == p["size"] else None
    if actual != p["sha256"]:
        os.unlink(part)
        why = f"sha256 {actual} != pinned {p['sha256']}" if actual else f"size {size} != pinned {p['size']}"
        module.fail_json(msg=f"{p['url']}: {why}; the download was deleted and nothing of it is used", **result)
    os.chmod(part, int(p["mode"], 8))
    os.replace(part, dest)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
