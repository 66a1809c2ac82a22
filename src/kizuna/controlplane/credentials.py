"""Workload bootstrap credentials: what the runtime hands each workload so that its sidecar can obtain a
certificate for its own identity, and no other.

A credential is an HMAC-SHA256 of the SPIFFE identity under a secret only the control plane and the runtime
share (``<state>/ca/bootstrap-secret``, mode 0600). Nothing here needs ``cryptography``, so the CLI and the
runtime can mint credentials without loading it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import time
from pathlib import Path
from typing import Final

DEFAULT_TRUST_DOMAIN: Final = "cluster.local"
CA_DIR: Final = "ca"
SECRET_FILE: Final = "bootstrap-secret"
PLUGGED_FILES: Final = ("ca-cert.pem", "ca-key.pem", "root-cert.pem", "cert-chain.pem")
"""Istio's ``cacerts`` layout: a plugged-in CA's certificate and key, the root, the chain up to it."""
_TRUST_DOMAIN: Final = re.compile(r"[a-z0-9._-]+")


class CredentialError(Exception):
    """The shared secret cannot be read."""


def check_trust_domain(trust_domain: str) -> str:
    """``trust_domain`` if SPIFFE allows it as a trust domain name (lowercase letters, digits, ``.``, ``-``,
    ``_``); raises ValueError naming the problem otherwise."""
    if not trust_domain or not _TRUST_DOMAIN.fullmatch(trust_domain):
        raise ValueError(f"trust domain {trust_domain!r}: must be lowercase letters, digits, '.', '-' or '_' "
                         "(a SPIFFE trust domain name, e.g. example.org)")
    return trust_domain


def spiffe_id(trust_domain: str, namespace: str, service_account: str) -> str:
    """``spiffe://cluster.local/ns/default/sa/bookinfo-productpage``."""
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"


def credential_for(secret: bytes, identity: str) -> str:
    """The bootstrap credential that lets a workload obtain ``identity`` (hex HMAC-SHA256)."""
    return hmac.new(secret, identity.encode(), hashlib.sha256).hexdigest()


def load_or_create_secret(state_dir: str | Path) -> bytes:
    """The state dir's bootstrap secret (created 0600 on first use)."""
    path = Path(state_dir) / CA_DIR / SECRET_FILE
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        for _ in range(200):  # the runtime and the control plane may both get here first: wait for the writer
            text = path.read_text().strip()
            if text:
                return bytes.fromhex(text)
            time.sleep(0.01)
        raise CredentialError(f"{path} is empty") from None
    secret = secrets.token_bytes(32)
    with os.fdopen(fd, "w") as out:
        out.write(secret.hex() + "\n")
    return secret


