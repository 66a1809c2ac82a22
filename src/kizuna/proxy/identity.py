"""The sidecar's workload identity: its own key, a certificate from the mesh's CA, renewed on its own.

The sidecar makes an EC P-256 key (in a forked child, ``proxy/csr.py``, so the sidecar itself never loads
``cryptography``) that never leaves it (briefly in a private 0700 directory, where Python's ``ssl`` loads it
from), sends the control plane a CSR for its SPIFFE identity together with the bootstrap
credential the runtime gave it, and builds TLS contexts from the answer: a server context for inbound mTLS
(client certificates required, verified against the mesh's roots) and a client context for outbound mTLS.
It renews at half the certificate's life with a little jitter (Istio's ``SECRET_GRACE_PERIOD_RATIO``), and a
failed renewal is retried with backoff while the old certificate still holds. Each new certificate swaps in
fresh contexts: connections already open keep theirs, new ones use the new certificate.

Peer identities are read from the certificate's URI SAN; ``peer_identity`` parses what ``ssl`` reports.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import shutil
import ssl
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from kizuna.proxy.http_client import request
from kizuna.proxyconfig.controlplane_tls import check_control_plane

log = logging.getLogger("kizuna.proxy.identity")

RENEW_AT: Final = 0.5
"""Renew once this share of the certificate's life has passed."""
RENEW_JITTER: Final = 0.02
RETRY_MIN: Final = 0.2
RETRY_MAX: Final = 10.0
INNER_PROTOCOLS: Final = ("http/1.1", "h2", "kizuna-tcp")
"""ALPN on mesh mTLS: the client names the protocol it carries inside (HTTP/1.1, HTTP/2, or opaque TCP); the
server accepts any of them."""


@dataclass(frozen=True, slots=True)
class Peer:
    """Who is on the other end of an mTLS connection."""

    principal: str
    """``cluster.local/ns/default/sa/sleep``: the SPIFFE ID without ``spiffe://`` (Istio's principal)."""

    @property
    def trust_domain(self) -> str:
        return self.principal.split("/", 1)[0]

    @property
    def namespace(self) -> str:
        parts = self.principal.split("/")
        return parts[2] if len(parts) >= 5 and parts[1] == "ns" else ""

    @property
    def service_account(self) -> str:
        parts = self.principal.split("/")
        return parts[4] if len(parts) >= 5 and parts[3] == "sa" else ""


def peer_identity(cert: dict[str, Any] | None) -> Peer | None:
    """The SPIFFE identity in a peer certificate as ``SSLObject.getpeercert()`` reports it."""
    if not cert:
        return None
    for kind, value in cert.get("subjectAltName", ()):
        if kind == "URI" and str(value).startswith("spiffe://"):
            return Peer(str(value)[len("spiffe://"):])
    return None


@dataclass(frozen=True, slots=True)
class Certificate:
    """What the CA answered: the chain (leaf first) and the trust bundle."""

    identity: str
    cert_chain: str
    roots: str
    not_after: float


class WorkloadIdentity:
    """One sidecar's key, certificate and TLS contexts."""

    def __init__(self, control_plane: Callable[[], str], token: Callable[[], str], namespace: str,
                 service_account: str, credential: str, ttl: float | None = None,
                 trust_domain: str = "cluster.local",
                 control_plane_tls: Callable[[], ssl.SSLContext | None] = lambda: None) -> None:
        self._control_plane = control_plane
        self._control_plane_tls = control_plane_tls
        """TLS to the control plane's API (the trust bundle, then this certificate); None: plain HTTP."""
        self.trust_domain = trust_domain
        self._token = token
        self.namespace = namespace
        self.service_account = service_account
        self.credential = credential
        self.ttl = ttl
        self.key = ""
        """The private key (PEM) of the current CSR and certificate."""
        self.certificate: Certificate | None = None
        self.server_context: ssl.SSLContext | None = None
        self.client_context: ssl.SSLContext | None = None
        """The client context for HTTP/1.1 (``context`` gives the one for each inner protocol)."""
        self._clients: dict[str, ssl.SSLContext] = {}
        self.renewals = 0
        self.failures = 0
        self.last_error = ""
        self._dir = tempfile.mkdtemp(prefix="kizuna-identity-")  # mode 0700
        self._task: asyncio.Task[None] | None = None

    # -- lifecycle ----------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Obtain the first certificate (retrying until it comes), then keep renewing in the background."""
        await self._obtain_until_done()
        self._task = asyncio.get_running_loop().create_task(self._renew_forever(), name="identity-renewal")

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        shutil.rmtree(self._dir, ignore_errors=True)

    def to_json(self) -> dict[str, Any]:
        cert = self.certificate
        return {"identity": cert.identity if cert else None, "notAfter": cert.not_after if cert else None,
                "renewals": self.renewals, "failures": self.failures, "lastError": self.last_error}

    @classmethod
    def from_files(cls, directory: str, namespace: str, service_account: str,
                   trust_domain: str = "cluster.local") -> WorkloadIdentity:
        """A file-mounted certificate (Istio's ``cert-chain.pem``, ``key.pem``, ``root-cert.pem``), not renewed."""
        identity = cls(lambda: "", lambda: "", namespace, service_account, "", trust_domain=trust_domain)
        folder = Path(directory)
        identity.key = (folder / "key.pem").read_text()
        try:  # the leaf's expiry, for status; ssl has no public parser for it
            decoded = ssl._ssl._test_decode_cert(str(folder / "cert-chain.pem"))  # type: ignore[attr-defined]
            not_after: float = ssl.cert_time_to_seconds(decoded["notAfter"])
        except (AttributeError, KeyError, ValueError, ssl.SSLError):
            not_after = float("inf")
        identity.install(Certificate(identity.spiffe_id, (folder / "cert-chain.pem").read_text(),
                                     (folder / "root-cert.pem").read_text(), not_after))
        return identity

    # -- what pools and listeners ask ---------------------------------------------------------------------

    def context(self, alpn: str = "http/1.1") -> ssl.SSLContext | None:
        """The client context of the current certificate for a connection carrying ``alpn`` (None before the
        first certificate)."""
        return self._clients.get(alpn)

    @staticmethod
    def check_peer(cert: dict[str, Any] | None, identity: str) -> str:
        """Secure naming: why the server's certificate is not ``identity``'s, or "" when it is."""
        peer = peer_identity(cert)
        if peer is None:
            return f"secure naming: expected spiffe://{identity}, the peer presented no SPIFFE identity"
        if peer.principal != identity:
            return f"secure naming: expected spiffe://{identity}, the peer presented spiffe://{peer.principal}"
        return ""

    # -- obtaining a certificate -------------------------------------------------------------------------

    def csr(self) -> str:
        """A new key and a CSR for this workload's SPIFFE identity (the CA checks it against the credential)."""
        return self._finish_csr(*self._start_csr())

    def _start_csr(self) -> tuple[int, int]:
        """Fork a child that makes the key and CSR (``proxy/csr.py``): ``cryptography`` is loaded there only.
        (Forked, not executed anew: in transparent mode the sidecar's UID may not reach the interpreter's
        path, which only its start-up could.) Returns (child pid, read end of its pipe)."""
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: no event loop, no threads; compute, write, leave
            status = 1
            try:
                os.close(read)
                from kizuna.proxy.csr import key_and_csr

                key, request = key_and_csr(self.spiffe_id)
                os.write(write, json.dumps({"key": key, "csr": request}).encode())
                status = 0
            finally:
                os._exit(status)
        os.close(write)
        return pid, read

    def _finish_csr(self, pid: int, read: int) -> str:
        """Wait for the child of ``_start_csr``; raises OSError when it failed."""
        with os.fdopen(read, "rb") as pipe:
            data = pipe.read()
        _, status = os.waitpid(pid, 0)
        if status != 0 or not data:
            raise OSError(f"making a key and CSR failed (child status {status})")
        answer = json.loads(data)
        self.key = str(answer["key"])
        return str(answer["csr"])

    @property
    def spiffe_id(self) -> str:
        """``spiffe://cluster.local/ns/<namespace>/sa/<service account>``."""
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    async def obtain(self) -> Certificate:
        """One round trip to the CA; raises OSError / ValueError / PermissionError on failure."""
        started = self._start_csr()  # forked from the loop's thread, then waited for off it
        csr = await asyncio.get_running_loop().run_in_executor(None, self._finish_csr, *started)
        body: dict[str, Any] = {"csr": csr, "namespace": self.namespace,
                                "serviceAccount": self.service_account, "credential": self.credential}
        if self.ttl is not None:
            body["ttl"] = self.ttl
        status, answer = await post_json(self._control_plane(), "/v1/certificates", body, self._token(),
                                         tls=self._control_plane_tls(), trust_domain=self.trust_domain)
        if status == 403:
            raise PermissionError(answer.get("errors", [answer])[0])
        if status != 200:
            raise ValueError(f"the control plane answered {status}: {answer}")
        cert = Certificate(str(answer["identity"]), str(answer["certChain"]), str(answer["roots"]),
                           float(answer["notAfter"]))
        self.install(cert)
        return cert

    def install(self, cert: Certificate) -> None:
        """Write the key and chain where ``ssl`` can load them, and swap in fresh contexts."""
        key_pem = self.key.encode()
        generation = self.renewals + self.failures + 1
        key_path = os.path.join(self._dir, f"key-{generation}.pem")
        chain_path = os.path.join(self._dir, f"chain-{generation}.pem")
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(key_pem)
        with open(chain_path, "w") as out:
            out.write(cert.cert_chain)
        server = mesh_context(ssl.PROTOCOL_TLS_SERVER, chain_path, key_path, cert.roots, INNER_PROTOCOLS)
        clients = {alpn: mesh_context(ssl.PROTOCOL_TLS_CLIENT, chain_path, key_path, cert.roots, (alpn,))
                   for alpn in INNER_PROTOCOLS}
        for path in (key_path, chain_path):
            os.unlink(path)  # loaded into the contexts; nothing needs them on disk any more
        self.certificate, self.server_context, self._clients = cert, server, clients
        self.client_context = clients["http/1.1"]

    async def _obtain_until_done(self) -> None:
        delay = RETRY_MIN
        while True:
            try:
                await self.obtain()
                return
            except (OSError, ValueError, KeyError) as exc:
                self.failures += 1
                self.last_error = str(exc)
                log.warning("cannot obtain a certificate for %s (retrying in %.1fs): %s", self.spiffe_id, delay,
                            exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)

    async def _renew_forever(self) -> None:
        while True:
            cert = self.certificate
            assert cert is not None
            lifetime = max(cert.not_after - time.time(), 0.0)
            wait = lifetime * RENEW_AT * (1 + random.uniform(-RENEW_JITTER, RENEW_JITTER))
            await asyncio.sleep(max(wait, 0.05))
            await self._obtain_until_done()
            self.renewals += 1


def mesh_context(purpose: ssl._SSLMethod, chain: str, key: str, roots: str,
                 alpn: tuple[str, ...] = INNER_PROTOCOLS) -> ssl.SSLContext:
    """A TLS context for mesh mTLS: TLS 1.2 at least (1.3 preferred), our certificate, peers verified against
    the mesh's roots. Names are not checked here: peers are SPIFFE identities, checked by the caller."""
    context = ssl.SSLContext(purpose)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(chain, key)
    context.load_verify_locations(cadata=roots)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    context.set_alpn_protocols(list(alpn))
    return context


async def post_json(address: str, path: str, body: dict[str, Any], token: str, timeout: float = 10.0,
                    tls: ssl.SSLContext | None = None,
                    trust_domain: str = "cluster.local") -> tuple[int, dict[str, Any]]:
    """POST ``body`` as JSON to the control plane at ``address`` (``host:port``) and return the status and the
    JSON answer; over TLS with ``tls``, refusing (PermissionError) a server that is not the control plane."""
    host, _, port = address.rpartition(":")
    response = await request(
        host.strip("[]"), int(port), "POST", path, host_header=address, timeout=timeout, tls=tls,
        headers=((b"Authorization", f"Bearer {token}".encode()), (b"Content-Type", b"application/json")),
        body=json.dumps(body).encode(),
        check_peer=None if tls is None else lambda cert: check_control_plane(cert, trust_domain))
    answer = json.loads(response.body or b"{}")
    if not isinstance(answer, dict):
        raise ValueError(f"the control plane answered {response.status} with JSON that is not an object")
    return response.status, answer
