"""A new EC P-256 key and a CSR for a SPIFFE identity.

The sidecar calls ``key_and_csr`` in a forked child so that it never loads ``cryptography`` itself (about
12 MiB of resident memory for a step taken once per certificate). The key goes to the sidecar over a pipe.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec


def key_and_csr(identity: str) -> tuple[str, str]:
    """(private key PEM, CSR PEM) for ``identity`` (a ``spiffe://`` URI SAN, empty subject)."""
    key = ec.generate_private_key(ec.SECP256R1())
    request = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([]))
               .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]),
                              critical=True)
               .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return key_pem.decode(), request.public_bytes(serialization.Encoding.PEM).decode()
