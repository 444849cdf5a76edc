"""The API key a run sends: from an environment variable or an instance's key file, as a bearer token."""

from __future__ import annotations

import os
from pathlib import Path

from .config import VerifyConfig
from .errors import VerifyError

API_KEY_FILE_VAR = "VLLM_API_KEY"


def read_api_key_file(path: str) -> str:
    """The key of an API key file: the unit's environment file (``VLLM_API_KEY=<key>``) or the bare key."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise VerifyError(
            f"API key file {path} does not exist (expected the instance's key file, e.g. /etc/llmfleet/api-keys/<name>.env)"
        ) from None
    except PermissionError:
        raise VerifyError(
            f"API key file {path} is not readable by this user (it is root-owned 0600: run as root, or use --api-key-env)"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise VerifyError(f"API key file {path} could not be read: {exc.__class__.__name__}") from None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    for ln in lines:
        if ln.startswith(API_KEY_FILE_VAR + "="):
            return ln[len(API_KEY_FILE_VAR) + 1 :].strip().strip("'\"")
    if len(lines) == 1 and "=" not in lines[0]:
        return lines[0]
    raise VerifyError(f"API key file {path} holds no {API_KEY_FILE_VAR}=<key> line and is not a bare key")


def auth_headers(config: VerifyConfig) -> dict[str, str]:
    """The ``Authorization`` header for the configured key (none without one); a missing or bad key ends the run."""
    if config.api_key_env is not None:
        source = f"environment variable {config.api_key_env}"
        key = os.environ.get(config.api_key_env, "")
    elif config.api_key_file is not None:
        source = f"API key file {config.api_key_file}"
        key = read_api_key_file(config.api_key_file)
    else:
        return {}
    if not key:
        raise VerifyError(f"{source} (the API key) is not set or empty")
    if any(c in key for c in "\r\n\0"):
        raise VerifyError(f"{source} holds an invalid API key (control characters)")
    return {"Authorization": f"Bearer {key}"}
