"""A small PKI for tests of TLS at the mesh's edges (gateway termination, origination): a self-signed CA and
leaf certificates for DNS names, written as PEM files. (Workload certificates come from the mesh's own CA.)"""

from __future__ import annotations

import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_ca(directory: Path, name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate, Path]:
    """A self-signed CA; returns its key, certificate and certificate file."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    path = directory / f"{name}.crt"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert, path


def issue(directory: Path, ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate, Path], name: str,
          dns: list[str], client: bool = False) -> tuple[Path, Path]:
    """A leaf certificate signed by ``ca`` for ``dns`` names; (certificate file, key file)."""
    ca_key, ca_cert, _ = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
    cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(d) for d in dns]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(_pem_key(key))
    return cert_path, key_path


def _ca(name: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[ec.EllipticCurvePrivateKey, x509.Certificate]
        | None = None) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    signer_key, issuer_name = (issuer[0], issuer[1].subject) if issuer else (key, _name(name))
    return (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(issuer_name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, content_commitment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(signer_key, hashes.SHA256()))


def make_cacerts(directory: Path) -> tuple[Path, tuple[ec.EllipticCurvePrivateKey, x509.Certificate]]:
    """Istio's ``cacerts`` layout in ``directory`` (a root, and an intermediate it signed for the mesh's CA):
    ``ca-cert.pem``, ``ca-key.pem``, ``root-cert.pem``, ``cert-chain.pem``. Returns the directory and the
    intermediate's (key, certificate), so a test can sign a peer of its own under the same root."""
    root_key, inter_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    root = _ca("Test Root CA", root_key)
    inter = _ca("Test Mesh Intermediate CA", inter_key, (root_key, root))
    directory.mkdir(parents=True, exist_ok=True)
    pem = serialization.Encoding.PEM
    (directory / "root-cert.pem").write_bytes(root.public_bytes(pem))
    (directory / "ca-cert.pem").write_bytes(inter.public_bytes(pem))
    (directory / "ca-key.pem").write_bytes(_pem_key(inter_key))
    (directory / "ca-key.pem").chmod(0o600)
    (directory / "cert-chain.pem").write_bytes(inter.public_bytes(pem) + root.public_bytes(pem))
    return directory, (inter_key, inter)


def issue_spiffe(directory: Path, signer: tuple[ec.EllipticCurvePrivateKey, x509.Certificate], identity: str,
                 name: str) -> tuple[Path, Path]:
    """A workload certificate for the SPIFFE ``identity`` (URI SAN, client and server use), signed by
    ``signer``; the certificate file holds the leaf then the signer. Returns (certificate file, key file)."""
    signer_key, signer_cert = signer
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(signer_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signer_key.public_key()),
                           critical=False)
            .sign(signer_key, hashes.SHA256()))
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    pem = serialization.Encoding.PEM
    cert_path.write_bytes(cert.public_bytes(pem) + signer_cert.public_bytes(pem))
    key_path.write_bytes(_pem_key(key))
    return cert_path, key_path
