"""TLS at the ingress gateway: server contexts for a listener's Gateway servers, chosen by SNI.

A listener whose servers terminate TLS (``SIMPLE``, ``MUTUAL``, ``OPTIONAL_MUTUAL``) holds each new connection
until its ClientHello names a server (``SniWait``), picks that server's context (``TlsContexts.pick``), and
terminates TLS with the sans-I/O ``TlsServer``; the decrypted stream is then served as the listener's protocol
says. Choosing the context before the handshake (rather than in ``sni_callback``) lets ``MUTUAL`` and
``SIMPLE`` servers share a port: OpenSSL keeps the first context's client-verification mode across a
callback's context switch.

Certificates are read from files on this host when a snapshot is applied (a missing or unreadable file refuses
the snapshot, with its path), and read again when the files change (checked at most once a second, on the next
connection: a rotated certificate is served without a config push; files caught half-written keep the previous
certificate until they read whole): the Gateway's ``serverCertificate`` / ``privateKey`` / ``caCertificates``,
or ``credentialName``, resolved to ``<credentials dir>/<name>/{tls.crt,tls.key,ca.crt}`` (Istio's secret keys;
``ca.crt`` only for MUTUAL and OPTIONAL_MUTUAL, else from ``<name>-cacert/ca.crt`` as Istio allows). The
credentials directory is ``credentials`` under the proxy's working directory, which ``kizuna up`` sets to the
state directory, so ``<state>/credentials/<name>``.
"""

from __future__ import annotations

import os
import ssl
import time
from pathlib import Path
from typing import Any, Final

from kizuna.proxy.file_stamps import Stamp, file_stamps
from kizuna.proxy.sni import sni_matches
from kizuna.proxyconfig.model import ServerTls

CREDENTIALS_DIR: Final = "credentials"
"""Where ``credentialName`` secrets live, relative to the gateway proxy's working directory."""
TERMINATING: Final = ("SIMPLE", "MUTUAL", "OPTIONAL_MUTUAL")
CLIENT_VERIFIED: Final = {"MUTUAL": ssl.CERT_REQUIRED, "OPTIONAL_MUTUAL": ssl.CERT_OPTIONAL}
"""Modes that check client certificates: MUTUAL requires one, OPTIONAL_MUTUAL verifies one when sent."""
RELOAD_CHECK: Final = 1.0
"""Seconds between checks of a listener's certificate files for changes."""
_VERSIONS: Final = {"TLSV1_0": ssl.TLSVersion.TLSv1, "TLSV1_1": ssl.TLSVersion.TLSv1_1,
                    "TLSV1_2": ssl.TLSVersion.TLSv1_2, "TLSV1_3": ssl.TLSVersion.TLSv1_3}


def credential_files(tls: ServerTls, credentials_dir: str | os.PathLike[str] = CREDENTIALS_DIR
                     ) -> tuple[str, str, str]:
    """(certificate chain, private key, client CA or "") files for a server."""
    if tls.credential_name:
        base = Path(credentials_dir) / tls.credential_name
        ca = ""
        if tls.mode in CLIENT_VERIFIED:
            # Istio also takes the client CA from a separate secret named <name>-cacert.
            separate = Path(credentials_dir) / f"{tls.credential_name}-cacert" / "ca.crt"
            ca = str(separate if not (base / "ca.crt").exists() and separate.exists() else base / "ca.crt")
        return str(base / "tls.crt"), str(base / "tls.key"), ca
    return tls.server_certificate, tls.private_key, tls.ca_certificates


def server_context(tls: ServerTls, credentials_dir: str | os.PathLike[str] = CREDENTIALS_DIR,
                   alpn: tuple[str, ...] = ()) -> ssl.SSLContext:
    """The server context for one terminating Gateway server; ValueError naming the file that is missing or
    unusable."""
    cert, key, ca = credential_files(tls, credentials_dir)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # Istio's gateway default minimum is TLS 1.2; TLS_AUTO leaves OpenSSL's maximum (1.3).
    context.minimum_version = _VERSIONS.get(tls.min_protocol_version, ssl.TLSVersion.TLSv1_2)
    if tls.max_protocol_version in _VERSIONS:
        context.maximum_version = _VERSIONS[tls.max_protocol_version]
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"gateway server {_name(tls)}: cannot load certificate {cert} / key {key}: "
                         f"{getattr(exc, 'strerror', None) or exc}") from exc
    if tls.mode in CLIENT_VERIFIED:
        if not ca:
            raise ValueError(f"gateway server {_name(tls)}: {tls.mode} needs caCertificates")
        try:
            context.load_verify_locations(ca)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"gateway server {_name(tls)}: cannot load client CA {ca}: "
                             f"{getattr(exc, 'strerror', None) or exc}") from exc
        context.verify_mode = CLIENT_VERIFIED[tls.mode]
    if alpn:
        context.set_alpn_protocols(list(alpn))
    return context


def client_san_problem(tls: ServerTls, peercert: dict[str, Any] | None) -> str:
    """Why a client's certificate carries none of the server's ``subjectAltNames`` ("" if it does, or when
    none are required)."""
    if not tls.subject_alt_names or (peercert is None and tls.mode == "OPTIONAL_MUTUAL"):
        return ""  # OPTIONAL_MUTUAL checks the names of a certificate only when one is presented
    names = {str(value) for _, value in peercert.get("subjectAltName", ())} if peercert else set()
    if names & set(tls.subject_alt_names):
        return ""
    return f"client certificate names {sorted(names)}, none of {list(tls.subject_alt_names)}"


def _name(tls: ServerTls) -> str:
    return ",".join(tls.hosts) or "*"


def _stamp(tls: ServerTls, credentials_dir: str | os.PathLike[str]) -> tuple[Stamp, ...]:
    """The stamps of a server's files: a change means read them again."""
    return file_stamps(credential_files(tls, credentials_dir))


class TlsContexts:
    """The terminating servers of one gateway listener, each with its context, picked by SNI."""

    __slots__ = ("servers", "credentials_dir", "alpn", "_stamps", "_checked")

    def __init__(self, servers: tuple[ServerTls, ...], credentials_dir: str | os.PathLike[str] = CREDENTIALS_DIR,
                 alpn: tuple[str, ...] = ()) -> None:
        self.credentials_dir = credentials_dir
        self.alpn = alpn
        terminating = [tls for tls in servers if tls.mode in TERMINATING]
        self._stamps = [_stamp(tls, credentials_dir) for tls in terminating]
        self.servers = [(tls, server_context(tls, credentials_dir, alpn)) for tls in terminating]
        self._checked = time.monotonic()

    def reload(self) -> None:
        """Read again the files of servers whose files changed; a server whose new files do not load keeps
        its previous context (the next check tries again)."""
        for i, (tls, _) in enumerate(self.servers):
            stamp = _stamp(tls, self.credentials_dir)
            if stamp == self._stamps[i]:
                continue
            try:
                context = server_context(tls, self.credentials_dir, self.alpn)
            except ValueError:
                continue
            self.servers[i] = (tls, context)
            self._stamps[i] = stamp

    def pick(self, sni: str) -> tuple[ServerTls, ssl.SSLContext] | None:
        """The server for ``sni``: an exact host, else the longest ``*.suffix``, else ``*``; with no SNI (or
        none matching) the server with host ``*``, else the first server (Envoy's default filter chain)."""
        now = time.monotonic()
        if now - self._checked >= RELOAD_CHECK:
            self._checked = now
            self.reload()
        sni = sni.lower().rstrip(".")
        best: tuple[int, int] | None = None
        for i, (tls, _) in enumerate(self.servers):
            for host in tls.hosts:
                host = host.lower()
                if not sni or host == "*":
                    rank = 0 if host == "*" else -1
                elif host == sni:
                    rank = 1_000
                elif host.startswith("*.") and sni_matches(host, sni):
                    rank = len(host)
                else:
                    continue
                if best is None or rank > best[0]:
                    best = (rank, i)
        if best is not None and best[0] >= 0:
            return self.servers[best[1]]
        return self.servers[0] if self.servers else None
