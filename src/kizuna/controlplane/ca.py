"""The mesh's certificate authority: workload certificates with SPIFFE identities, signed for sidecars' CSRs.

The CA key lives in ``<state>/ca/`` (mode 0600) and never leaves the control plane. Its root is either
self-signed on first start (10 years, as istiod's) or plugged in from files in Istio's ``cacerts`` layout
(``ca-cert.pem``, ``ca-key.pem``, ``root-cert.pem``, ``cert-chain.pem``): then kizuna signs with that
intermediate and publishes ``root-cert.pem`` as the trust anchor.

A sidecar proves which identity it may have with a bootstrap credential: an HMAC of its SPIFFE identity under
a secret only the control plane and the runtime share (``<state>/ca/bootstrap-secret``). The runtime hands each
workload the credential of its own service account and no other; the CA signs a CSR only for the identity its
credential names and only with that URI SAN. Certificates last 24 h unless configured (down to seconds for
tests); trust bundles may hold several roots, so a root rotation can publish old and new together.
"""

from __future__ import annotations

import datetime
import hmac
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kizuna.controlplane.credentials import (
    CA_DIR,
    DEFAULT_TRUST_DOMAIN,
    PLUGGED_FILES,
    credential_for,
    load_or_create_secret,
    spiffe_id,
)

DEFAULT_WORKLOAD_TTL: Final = 24 * 3600.0
MAX_WORKLOAD_TTL: Final = 90 * 24 * 3600.0
ROOT_TTL: Final = 3650 * 24 * 3600.0
CLOCK_SKEW: Final = 60.0
"""Certificates start this many seconds in the past, so a peer's clock a little behind still accepts them."""


class CaError(Exception):
    """A request the CA refuses (bad credential, wrong identity, malformed CSR); the message says why."""


@dataclass(frozen=True)
class Issued:
    """A signed workload certificate: its chain (leaf first, up to but not including the root) and roots."""

    identity: str
    cert_chain: str
    roots: str
    not_after: float

    def to_json(self) -> dict[str, object]:
        return {"identity": self.identity, "certChain": self.cert_chain, "roots": self.roots,
                "notAfter": self.not_after}


class CertificateAuthority:
    """Signs workload CSRs with the mesh's CA key."""

    def __init__(self, key: ec.EllipticCurvePrivateKey | object, cert: x509.Certificate,
                 chain: list[x509.Certificate], roots: list[x509.Certificate], secret: bytes,
                 trust_domain: str = DEFAULT_TRUST_DOMAIN, workload_ttl: float = DEFAULT_WORKLOAD_TTL,
                 directory: Path | None = None) -> None:
        self.directory = directory
        """Where a self-signed root lives (None for a plugged-in CA: rotated outside the mesh)."""
        self.pending: tuple[object, x509.Certificate, float] | None = None
        """A root rotation under way: (new key, new root, when signing switches to it)."""
        self.key = key
        self.cert = cert
        self.chain = chain
        """Certificates between ``cert`` and a root (empty for a self-signed root CA)."""
        self.roots = roots
        self.secret = secret
        self.trust_domain = trust_domain
        self.workload_ttl = min(workload_ttl, MAX_WORKLOAD_TTL)

    @classmethod
    def load_or_create(cls, state_dir: str | Path, trust_domain: str = DEFAULT_TRUST_DOMAIN,
                       workload_ttl: float = DEFAULT_WORKLOAD_TTL,
                       plugged: str | Path | None = None) -> CertificateAuthority:
        """The CA of a state dir: from ``plugged`` (Istio's cacerts files) when given, else the state dir's
        self-signed root, created on first start."""
        directory = Path(state_dir) / CA_DIR
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        secret = load_or_create_secret(state_dir)
        if plugged is not None:
            source = Path(plugged)
            missing = [n for n in PLUGGED_FILES if not (source / n).is_file()]
            if missing:
                raise CaError(f"{source}: missing {', '.join(missing)} (Istio's cacerts layout)")
            key = serialization.load_pem_private_key((source / "ca-key.pem").read_bytes(), None)
            cert = x509.load_pem_x509_certificate((source / "ca-cert.pem").read_bytes())
            chain = [c for c in x509.load_pem_x509_certificates((source / "cert-chain.pem").read_bytes())
                     if c != cert]
            roots = x509.load_pem_x509_certificates((source / "root-cert.pem").read_bytes())
            chain = [c for c in chain if c not in roots]
            return cls(key, cert, chain, roots, secret, trust_domain, workload_ttl)
        key_path, cert_path = directory / "root-key.pem", directory / "root-cert.pem"
        if key_path.is_file() and cert_path.is_file():
            key = serialization.load_pem_private_key(key_path.read_bytes(), None)
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        else:
            key, cert = self_signed_root(trust_domain)
            _write_private(key_path, key.private_bytes(serialization.Encoding.PEM,
                                                       serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
            cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        extra = directory / "extra-roots.pem"
        roots = [cert] + (x509.load_pem_x509_certificates(extra.read_bytes()) if extra.is_file() else [])
        ca = cls(key, cert, [], roots, secret, trust_domain, workload_ttl, directory)
        rotation = directory / "rotation.json"
        if rotation.is_file():
            switch_at = float(json.loads(rotation.read_text())["switchAt"])
            new_key = serialization.load_pem_private_key((directory / "next-root-key.pem").read_bytes(), None)
            new_root = x509.load_pem_x509_certificate((directory / "next-root-cert.pem").read_bytes())
            ca.pending = (new_key, new_root, switch_at)
            ca.roots = [cert, new_root, *roots[1:]]
        return ca

    # -- root rotation ----------------------------------------------------------------------------------

    def rotate_root(self, grace: float) -> float:
        """Start replacing the root: a new one is trusted (published with the old in every trust bundle)
        at once and signs from ``grace`` seconds on; returns that time. With ``grace`` at least the workload
        certificate lifetime, every sidecar renews, and so learns the new root, before any certificate signed
        by it exists, and no connection fails across the change."""
        if self.directory is None:
            raise CaError("a plugged-in CA (cacerts) is rotated outside the mesh: replace its files")
        if self.pending is not None:
            raise CaError("a root rotation is already under way")
        new_key, new_root = self_signed_root(self.trust_domain)
        switch_at = time.time() + grace
        _write_private(self.directory / "next-root-key.pem", new_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        (self.directory / "next-root-cert.pem").write_bytes(new_root.public_bytes(serialization.Encoding.PEM))
        (self.directory / "rotation.json").write_text(json.dumps({"switchAt": switch_at}))
        self.pending = (new_key, new_root, switch_at)
        self.roots = [self.cert, new_root, *self.roots[1:]]
        return switch_at

    def _switch_if_due(self, now: float) -> None:
        """Sign with the new root once the rotation's grace is over; the old root stays trusted."""
        if self.pending is None or now < self.pending[2] or self.directory is None:
            return
        new_key, new_root, _ = self.pending
        old = self.cert
        directory = self.directory
        with open(directory / "extra-roots.pem", "ab") as out:
            out.write(old.public_bytes(serialization.Encoding.PEM))
        os.replace(directory / "next-root-key.pem", directory / "root-key.pem")
        os.replace(directory / "next-root-cert.pem", directory / "root-cert.pem")
        (directory / "rotation.json").unlink()
        self.key, self.cert, self.pending = new_key, new_root, None
        self.roots = [new_root, *[r for r in self.roots if r != new_root]]

    def roots_pem(self) -> str:
        """The trust bundle: every root a peer's certificate may chain to."""
        return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in self.roots)

    def credential(self, namespace: str, service_account: str) -> str:
        """The bootstrap credential for a workload running as ``service_account`` in ``namespace``."""
        return credential_for(self.secret, spiffe_id(self.trust_domain, namespace, service_account))

    def sign(self, csr_pem: str, namespace: str, service_account: str, credential: str,
             ttl: float | None = None, max_ttl: float | None = None) -> Issued:
        """A certificate for the CSR, if ``credential`` is the one for ``namespace``/``service_account`` and
        the CSR asks for exactly that SPIFFE identity; raises CaError otherwise."""
        self._switch_if_due(time.time())
        identity = spiffe_id(self.trust_domain, namespace, service_account)
        if not hmac.compare_digest(credential_for(self.secret, identity), credential or ""):
            raise CaError(f"the credential does not grant {identity}")
        try:
            csr = x509.load_pem_x509_csr(csr_pem.encode())
        except ValueError as exc:
            raise CaError(f"malformed CSR: {exc}") from None
        if not csr.is_signature_valid:
            raise CaError("the CSR's signature does not verify")
        try:
            sans = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
        except x509.ExtensionNotFound:
            uris = []
        if uris != [identity]:
            raise CaError(f"the CSR asks for {uris or 'no URI SAN'}; this credential grants only {identity}")
        limit = max_ttl or self.workload_ttl
        lifetime = min(ttl or limit, limit)
        now = datetime.datetime.now(datetime.UTC)
        not_after = now + datetime.timedelta(seconds=lifetime)
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([]))
                .issuer_name(self.cert.subject)
                .public_key(csr.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(seconds=CLOCK_SKEW))
                .not_valid_after(not_after)
                .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]),
                               critical=True)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=True,
                                             content_commitment=False, data_encipherment=False,
                                             key_agreement=False, key_cert_sign=False, crl_sign=False,
                                             encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    self.cert.public_key()), critical=False)  # type: ignore[arg-type]
                .sign(self.key, hashes.SHA256()))  # type: ignore[arg-type]
        chain = [cert, *([self.cert] if self.chain or self.cert not in self.roots else []), *self.chain]
        pem = "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in chain)
        return Issued(identity, pem, self.roots_pem(), not_after.timestamp())


def issue_own(ca: CertificateAuthority, identity: str, ttl: float = 365 * 24 * 3600.0) -> tuple[str, str]:
    """A key and certificate the CA makes for a server of its own (the control plane's API): ``(chain PEM,
    key PEM)``. The key is made here and written only to the control plane's private directory."""
    key = ec.generate_private_key(ec.SECP256R1())
    request = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
               .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]),
                              critical=True)
               .sign(key, hashes.SHA256()))
    parts = identity.split("/")  # spiffe://<domain>/ns/<ns>/sa/<sa>
    namespace, account = parts[4], parts[6]
    issued = ca.sign(request.public_bytes(serialization.Encoding.PEM).decode(), namespace, account,
                     ca.credential(namespace, account), ttl=ttl, max_ttl=ttl)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return issued.cert_chain, key_pem.decode()


def self_signed_root(trust_domain: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A new root CA key and certificate (EC P-256, 10 years), named after the trust domain."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
                      x509.NameAttribute(NameOID.COMMON_NAME, f"kizuna root CA ({trust_domain})")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(seconds=CLOCK_SKEW))
            .not_valid_after(now + datetime.timedelta(seconds=ROOT_TTL))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, content_commitment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
