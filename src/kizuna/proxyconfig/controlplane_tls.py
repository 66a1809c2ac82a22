"""How clients reach the control plane over TLS: whom to trust and whom to expect.

The control plane's API and discovery stream are served over TLS with a certificate its own CA signs for
Istio's control-plane identity (``spiffe://<trust domain>/ns/istio-system/sa/istiod``). Clients (the CLI, the
runtime, sidecars) verify it against the mesh's trust bundle (``<state>/ca/trust-bundle.pem``) and check that
identity, since any workload certificate chains to the same roots. A sidecar that already holds its workload
certificate presents it, so the control plane knows which workload is on each stream.
"""

from __future__ import annotations

import ssl
from typing import Any, Final

CONTROL_PLANE_NAMESPACE: Final = "istio-system"
CONTROL_PLANE_ACCOUNT: Final = "istiod"
TRUST_BUNDLE: Final = "ca/trust-bundle.pem"
"""The trust bundle's path inside a state dir."""


def control_plane_identity(trust_domain: str = "cluster.local") -> str:
    """``spiffe://cluster.local/ns/istio-system/sa/istiod``."""
    return f"spiffe://{trust_domain}/ns/{CONTROL_PLANE_NAMESPACE}/sa/{CONTROL_PLANE_ACCOUNT}"


def client_context(trust_bundle: str) -> ssl.SSLContext:
    """A context that verifies the control plane's certificate against ``trust_bundle`` (names are checked
    by ``check_control_plane``: the certificate carries a SPIFFE identity, not a host name)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cafile=trust_bundle)
    return context


def check_control_plane(peercert: dict[str, Any] | None, trust_domain: str = "cluster.local") -> str:
    """Why the peer is not the control plane ("" when it is)."""
    wanted = control_plane_identity(trust_domain)
    uris = [str(v) for k, v in (peercert or {}).get("subjectAltName", ()) if k == "URI"]
    if wanted in uris:
        return ""
    return f"the control plane's certificate names {uris or 'no identity'}, not {wanted}"
