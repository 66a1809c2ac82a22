"""The certificate authority: self-signed root by default, Istio's ``cacerts`` files plugged in, and the CSR
checks that keep one workload from obtaining another's identity."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from kizuna.controlplane.ca import CaError, CertificateAuthority
from kizuna.proxy.csr import key_and_csr


def _ca_cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name | None = None,
             signer: ec.EllipticCurvePrivateKey | None = None) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.UTC)
    return (x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1)).not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(signer or key, hashes.SHA256()))


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def plugged(tmp_path: Path) -> Path:
    """Istio's cacerts layout: an intermediate (ca-cert, ca-key) under a root (root-cert), and the chain."""
    root_key, inter_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    root = _ca_cert("Corp Root CA", root_key)
    inter = _ca_cert("Mesh Intermediate CA", inter_key, root.subject, root_key)
    folder = tmp_path / "cacerts"
    folder.mkdir()
    (folder / "root-cert.pem").write_bytes(pem(root))
    (folder / "ca-cert.pem").write_bytes(pem(inter))
    (folder / "ca-key.pem").write_bytes(inter_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (folder / "cert-chain.pem").write_bytes(pem(inter) + pem(root))
    return folder


def chains_to(chain: str, roots: str) -> bool:
    """Does ``chain`` (leaf first) lead, signature by signature, to one of ``roots``?"""
    certs = x509.load_pem_x509_certificates(chain.encode())
    anchors = {c.subject: c for c in x509.load_pem_x509_certificates(roots.encode())}
    issuers = {c.subject: c for c in certs[1:]} | anchors
    current = certs[0]
    for _ in range(5):
        parent = issuers.get(current.issuer)
        if parent is None:
            return False
        current.verify_directly_issued_by(parent)  # raises on a bad signature
        if parent.subject in anchors:
            return True
        current = parent
    return False


def test_plugged_intermediate_signs_and_the_root_is_the_trust_anchor(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path / "state", plugged=plugged(tmp_path))
    _, csr = key_and_csr("spiffe://cluster.local/ns/default/sa/sleep")
    issued = ca.sign(csr, "default", "sleep", ca.credential("default", "sleep"))
    chain = x509.load_pem_x509_certificates(issued.cert_chain.encode())
    assert [c.subject.rfc4514_string() for c in chain] == ["", "CN=Mesh Intermediate CA"]
    assert "Corp Root CA" in x509.load_pem_x509_certificates(issued.roots.encode())[0].subject.rfc4514_string()
    assert chains_to(issued.cert_chain, issued.roots)


def test_missing_cacerts_files_are_named(tmp_path: Path) -> None:
    folder = plugged(tmp_path)
    (folder / "ca-key.pem").unlink()
    with pytest.raises(CaError, match="missing ca-key.pem"):
        CertificateAuthority.load_or_create(tmp_path / "state", plugged=folder)


def test_a_credential_buys_only_its_own_identity(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path)
    _, csr = key_and_csr("spiffe://cluster.local/ns/default/sa/httpbin")
    with pytest.raises(CaError, match="does not grant"):  # sleep's credential, asking for httpbin
        ca.sign(csr, "default", "httpbin", ca.credential("default", "sleep"))
    with pytest.raises(CaError, match="grants only"):  # sleep's credential, a CSR naming httpbin
        ca.sign(csr, "default", "sleep", ca.credential("default", "sleep"))
    assert ca.sign(csr, "default", "httpbin", ca.credential("default", "httpbin")).identity.endswith("sa/httpbin")
