"""Header work on a request or response head, pure. Istio's header operations: ``set`` overwrites, ``add`` appends,
``remove`` drops (names compared case-insensitively; values written as configured)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, Protocol

from kizuna.proxyconfig.actions import HeaderOps

Headers = tuple[tuple[bytes, bytes], ...]


def apply_ops(ops: HeaderOps, headers: Headers) -> Headers:
    """``headers`` after ``ops``: removed and overwritten names dropped, then ``set`` and ``add`` appended."""
    drop = {n.encode("latin-1") for n in ops.remove}
    drop.update(n.encode("latin-1") for n, _ in ops.set)
    kept = [(n, v) for n, v in headers if n.lower() not in drop] if drop else list(headers)
    kept += [(n.encode("latin-1"), v.encode("latin-1")) for n, v in ops.set]
    kept += [(n.encode("latin-1"), v.encode("latin-1")) for n, v in ops.add]
    return tuple(kept)


def shadow_host(authority: bytes) -> bytes:
    """Envoy's mirror Host: ``-shadow`` appended to the host, before any port (``httpbin:8000`` →
    ``httpbin-shadow:8000``)."""
    host, sep, port = authority.rpartition(b":")
    if sep and host and port.isdigit() and not host.endswith(b":"):
        return host + b"-shadow:" + port
    return authority + b"-shadow"


class _Transport(Protocol):
    def get_extra_info(self, name: str, default: object = None) -> object: ...


FORWARDED_PROTO: Final = b"x-forwarded-proto"


def forwarded_proto(headers: Sequence[tuple[bytes, bytes]],
                    transport: _Transport | None) -> tuple[tuple[bytes, bytes], ...]:
    """``headers`` with Envoy's ``x-forwarded-proto`` for the edge: the scheme the client used to reach the
    gateway (``https`` where a TLS server terminated the connection), replacing what the client claimed, so an
    app behind the gateway builds its links and redirects with the right scheme."""
    tls = transport is not None and transport.get_extra_info("ssl_object") is not None
    kept = tuple(h for h in headers if h[0].lower() != FORWARDED_PROTO)
    return (*kept, (FORWARDED_PROTO, b"https" if tls else b"http"))
