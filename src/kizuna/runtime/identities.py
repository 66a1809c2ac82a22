"""What ``kizuna up`` decides about workload identity: the mesh's trust domain, the plugged-in CA, and where
each workload's bootstrap credential is written.

A bootstrap credential lets its holder obtain a certificate for one SPIFFE identity, so each is written to a
file of its own, mode 0600 (``<state>/identities/<instance>.credential``; in transparent mode owned by the
sidecar's UID in the mesh's run directory), and the bootstraps name that file instead of carrying it: the
bootstrap copies in ``<state>/proxies/`` are for people and tools to read. docs/architecture.md ("Who can
read a credential") says what this separates and what it does not.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from kizuna.controlplane.credentials import (
    DEFAULT_TRUST_DOMAIN,
    PLUGGED_FILES,
    check_trust_domain,
    credential_for,
    load_or_create_secret,
    spiffe_id,
)
from kizuna.runtime.errors import UserError
from kizuna.runtime.state import StateDir

IDENTITIES_DIR = "identities"


def choose_trust_domain(flag: str | None, resources: Iterable[Any]) -> str:
    """``--trust-domain``, else the first MeshConfig's ``trustDomain`` among the manifests, else
    ``cluster.local``; a flag and a MeshConfig that disagree are refused (UserError)."""
    configured = [r for r in resources if r.kind == "MeshConfig" and getattr(r.spec, "trust_domain", "")]
    configured.sort(key=lambda r: (r.namespace, r.name))  # the first by (namespace, name) holds, as for compile
    from_config = configured[0].spec.trust_domain if configured else None
    if flag and from_config and flag != from_config:
        raise UserError(f"--trust-domain {flag}: MeshConfig {configured[0].namespace}/{configured[0].name} "
                        f"says trustDomain {from_config}; give one of them")
    chosen = flag or from_config or DEFAULT_TRUST_DOMAIN
    try:
        return check_trust_domain(chosen)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def check_cacerts(directory: Path | None) -> str | None:
    """``--cacerts``: the directory's absolute path once it holds Istio's four files (UserError otherwise)."""
    if directory is None:
        return None
    missing = [n for n in PLUGGED_FILES if not (directory / n).is_file()]
    if missing:
        raise UserError(f"--cacerts {directory}: missing {', '.join(missing)} (Istio's cacerts layout: "
                        f"{', '.join(PLUGGED_FILES)})")
    return str(directory.absolute())


def trust_domain(state: StateDir) -> str:
    """The trust domain the mesh in ``state`` was started with (``runtime.json``)."""
    return str((state.read_runtime() or {}).get("trustDomain") or DEFAULT_TRUST_DOMAIN)


def credential(state: StateDir, namespace: str, service_account: str) -> str:
    """The bootstrap credential of ``namespace``/``service_account`` in the mesh's trust domain."""
    identity = spiffe_id(trust_domain(state), namespace, service_account)
    return credential_for(load_or_create_secret(state.root), identity)


def credential_path(state: StateDir, node_id: str) -> Path:
    """Where the credential of the proxy ``node_id`` is written in proxy mode."""
    return state.root / IDENTITIES_DIR / f"{node_id}.credential"


def write_credential(path: Path, value: str, owner: tuple[int, int] | None = None) -> Path:
    """Write one credential to ``path``, mode 0600 (owned by ``owner``'s uid and gid when given); its
    directory is made 0700 unless it exists."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.unlink(missing_ok=True)  # a new inode: nobody holding the old file open reads the new value
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, (value + "\n").encode())
        if owner is not None:
            os.fchown(fd, *owner)
    finally:
        os.close(fd)
    return path


def clear(state: StateDir) -> None:
    """Forget the credentials of an earlier session."""
    folder = state.root / IDENTITIES_DIR
    for old in folder.glob("*.credential") if folder.is_dir() else ():
        old.unlink(missing_ok=True)
