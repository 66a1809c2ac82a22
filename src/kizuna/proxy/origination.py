"""TLS origination to external services: DestinationRule ``tls.mode`` SIMPLE and MUTUAL (Istio's egress TLS
origination task: the app speaks plain HTTP, its sidecar speaks HTTPS to the upstream).

The server is verified against ``caCertificates`` or, without them, the system trust store; its name is the
DestinationRule's ``sni``, else the cluster's service host, and the server certificate must be for that name
(Istio verifies at the client by default) unless ``subjectAltNames`` are given: then it must carry one of
those instead. ``insecureSkipVerify`` verifies nothing. MUTUAL adds the client certificate and key. Contexts
are built once per setting and state of its files (a renewed client certificate or CA file is read on the
next new connection) and shared by every connection of the cluster.
"""

from __future__ import annotations

import ssl
from functools import lru_cache
from typing import Any

from kizuna.proxy.file_stamps import Stamp, file_stamps
from kizuna.proxyconfig.model import UpstreamTls


def origination_context(tls: UpstreamTls) -> ssl.SSLContext:
    """The client context for ``tls`` as its files are now; ValueError naming a file that cannot be read."""
    return _context(tls, _stamp(tls))


def _stamp(tls: UpstreamTls) -> tuple[Stamp, ...]:
    return file_stamps((tls.ca_certificates, tls.client_certificate, tls.private_key))


@lru_cache(maxsize=64)
def _context(tls: UpstreamTls, _stamp: tuple[Stamp, ...]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.insecure_skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        try:
            if tls.ca_certificates:
                context.load_verify_locations(tls.ca_certificates)
            else:
                context.load_default_certs()
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"cannot load caCertificates {tls.ca_certificates}: "
                             f"{getattr(exc, 'strerror', None) or exc}") from exc
        # subjectAltNames replace the host-name check (see ``san_problem``).
        context.check_hostname = not tls.subject_alt_names
    if tls.mode == "MUTUAL":
        try:
            context.load_cert_chain(tls.client_certificate, tls.private_key)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"cannot load clientCertificate {tls.client_certificate} / privateKey "
                             f"{tls.private_key}: {getattr(exc, 'strerror', None) or exc}") from exc
    return context


def server_name(tls: UpstreamTls, service: str) -> str:
    """The SNI (and the name verified) for an upstream of ``service``."""
    return tls.sni or service


def san_problem(tls: UpstreamTls, peercert: dict[str, Any] | None) -> str:
    """Why the server certificate carries none of ``subject_alt_names`` ("" when it does or none are set)."""
    if not tls.subject_alt_names or tls.insecure_skip_verify:
        return ""
    names = {str(value) for _, value in peercert.get("subjectAltName", ())} if peercert else set()
    if names & set(tls.subject_alt_names):
        return ""
    return f"upstream certificate names {sorted(names)}, none of the subjectAltNames {list(tls.subject_alt_names)}"
