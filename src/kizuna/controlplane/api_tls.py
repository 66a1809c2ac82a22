"""The control plane's own TLS: a certificate from its CA for ``istiod``'s identity, and the trust bundle that
clients verify it with (see ``proxyconfig/controlplane_tls.py`` for the client side).

Made at every start (the certificate lasts a year; a restart renews it). The key is written 0600 next to the
CA's; the trust bundle (the CA's roots, public) goes to ``<state>/ca/trust-bundle.pem`` for the CLI, the
runtime and the sidecars. Client certificates are optional: sidecars present theirs once they have one.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path

from kizuna.controlplane.ca import CertificateAuthority, issue_own
from kizuna.controlplane.credentials import CA_DIR
from kizuna.proxyconfig.controlplane_tls import TRUST_BUNDLE, control_plane_identity


def server_context(ca: CertificateAuthority, state_dir: str | Path) -> ssl.SSLContext:
    """The API listener's TLS context; writes the trust bundle for clients."""
    state = Path(state_dir)
    chain, key = issue_own(ca, control_plane_identity(ca.trust_domain))
    directory = state / CA_DIR
    chain_path, key_path = directory / "controlplane-cert.pem", directory / "controlplane-key.pem"
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(key)
    chain_path.write_text(chain)
    write_trust_bundle(ca, state)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(chain_path, key_path)
    context.verify_mode = ssl.CERT_OPTIONAL
    context.load_verify_locations(cadata=ca.roots_pem())
    return context


def write_trust_bundle(ca: CertificateAuthority, state_dir: str | Path) -> None:
    """``<state>/ca/trust-bundle.pem``: the CA's roots (all of them during a root rotation), atomically."""
    bundle = Path(state_dir) / TRUST_BUNDLE
    tmp = bundle.with_suffix(".tmp")
    tmp.write_text(ca.roots_pem())
    tmp.chmod(0o644)
    os.replace(tmp, bundle)
