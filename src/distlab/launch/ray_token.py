"""Ray's auth token: where Ray 2.60 reads it, and making one for a new cluster.

A cluster started with ``ray start`` uses token authentication (``RAY_AUTH_MODE=token``):
its nodes and every driver that joins it send the token from ``RAY_AUTH_TOKEN``, else
the file at ``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``. ``ray start --head``
does not make one: on a machine where no Ray instance ever ran it fails with "no
authentication token was found". ``distlab cluster up`` makes it first
(``ensure_auth_token``), the way ``ray get-auth-token --generate`` does.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def auth_token_path() -> Path:
    """The file Ray reads the token from when ``RAY_AUTH_TOKEN`` is unset."""
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")


def auth_token_available() -> bool:
    """Whether a Ray auth token is where Ray 2.60 reads one (env, RAY_AUTH_TOKEN_PATH, ~/.ray)."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return True
    try:
        return bool(auth_token_path().expanduser().read_text().strip())
    except OSError:
        return False


def ensure_auth_token() -> Path | None:
    """Make a token where Ray reads it if there is none; return its file if made here."""
    if auth_token_available():
        return None
    path = auth_token_path().expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    # 256 random bits as hex, as Ray's own generator; readable by this user only
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(secrets.token_hex(32))
    return path
