"""Istio's header operations on a request or response head, pure: ``set`` overwrites, ``add`` appends,
``remove`` drops (names compared case-insensitively; values written as configured)."""

from __future__ import annotations

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
