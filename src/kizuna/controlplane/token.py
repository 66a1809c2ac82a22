"""The bearer token that guards the control plane's API and discovery stream.

Created once per state dir (``<state>/token``, mode 0600) and reused by every later start, so sidecars and the
CLI keep working across control plane restarts. Anyone who can read the file can drive the mesh; the file mode
is the whole access policy, as with a kubeconfig.
"""

from __future__ import annotations

import hmac
import os
import secrets
import stat
from pathlib import Path

TOKEN_FILE = "token"


def token_path(state_dir: str | Path) -> Path:
    """Where the token of the mesh in ``state_dir`` lives."""
    return Path(state_dir) / TOKEN_FILE


def load_or_create_token(state_dir: str | Path) -> str:
    """Return the state dir's token, creating it (mode 0600) on first use; tightens a too-open mode."""
    path = token_path(state_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    try:
        # O_EXCL: two control planes started at once must not each write (and then disagree on) a token.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if stat.S_IMODE(path.stat().st_mode) & 0o077:
            path.chmod(0o600)
        existing = read_token(path)
        if existing:
            return existing
        # An empty file is a crash between create and write; replace it rather than run unauthenticated.
        tmp = path.with_name(f".{TOKEN_FILE}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(token + "\n")
        os.replace(tmp, path)
        return token
    with os.fdopen(fd, "w") as out:
        out.write(token + "\n")
    return token


def read_token(path: str | Path) -> str:
    """The token stored in ``path`` (whitespace stripped); raises OSError when it cannot be read."""
    return Path(path).read_text().strip()


def token_matches(expected: str, authorization: str | None) -> bool:
    """True when an ``Authorization`` header value carries ``expected`` as its bearer token."""
    if not authorization or not expected:
        return False
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    # Constant time, so the token cannot be guessed byte by byte from response timing.
    return hmac.compare_digest(value.strip().encode(), expected.encode())
