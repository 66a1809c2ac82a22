"""``python -m kizuna.proxy.csr SPIFFE_ID``: a new EC P-256 key and a CSR for that identity, as JSON on stdout.

The sidecar calls ``key_and_csr`` in a forked child so that it never loads ``cryptography`` itself (about
12 MiB of resident memory for a step taken once per certificate). The key goes to the sidecar over a pipe.
"""

from __future__ import annotations

import json
import sys

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


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not argv[0].startswith("spiffe://"):
        print("usage: python -m kizuna.proxy.csr spiffe://TRUST-DOMAIN/ns/NS/sa/SA", file=sys.stderr)
        return 2
    key, csr = key_and_csr(argv[0])
    json.dump({"key": key, "csr": csr}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
