"""Resource kind names as users type them: case-insensitive, singular, plural or short (``vs``, ``svc``).

Short names are Kubernetes' and Istio's own (``kubectl api-resources``): ``deploy``, ``svc``, ``sa``, ``vs``,
``dr``, ``gw``, ``se``, ``we``, ``wg``, ``pa``, ``ra``, ``ap``.
"""

from __future__ import annotations

from collections.abc import Iterable

from kizuna.runtime.errors import UserError

SHORT_NAMES: dict[str, tuple[str, ...]] = {
    "Deployment": ("deploy",),
    "Service": ("svc",),
    "ServiceAccount": ("sa",),
    "Namespace": ("ns",),
    "VirtualService": ("vs",),
    "DestinationRule": ("dr",),
    "Gateway": ("gw",),
    "ServiceEntry": ("se",),
    "Sidecar": (),
    "WorkloadEntry": ("we",),
    "WorkloadGroup": ("wg",),
    "EnvoyFilter": (),
    "PeerAuthentication": ("pa",),
    "RequestAuthentication": ("ra",),
    "AuthorizationPolicy": ("ap",),
    "Telemetry": ("telemetry",),
    "MeshConfig": (),
}
"""Every kind the CLI knows, with its short names."""


def plural(kind: str) -> str:
    """A kind's lower-case plural, as in resource paths: ``virtualservices``, ``authorizationpolicies``."""
    lower = kind.lower()
    if lower.endswith("y") and lower[-2:-1] not in ("a", "e", "o", "u"):
        return lower[:-1] + "ies"
    if lower.endswith(("s", "x", "ch", "sh")):
        return lower + "es"
    return lower + "s"


def aliases(kinds: Iterable[str] = SHORT_NAMES) -> dict[str, str]:
    """Every accepted spelling (lower-case) mapped to its kind."""
    table: dict[str, str] = {}
    for kind in kinds:
        for name in (kind.lower(), plural(kind), *SHORT_NAMES.get(kind, ())):
            table.setdefault(name, kind)
    return table


def resolve_kind(text: str, kinds: Iterable[str] = SHORT_NAMES) -> str:
    """The kind ``text`` names (``vs`` → ``VirtualService``); UserError listing the known kinds otherwise."""
    known = list(kinds)
    # "virtualservices.networking.istio.io" is how kubectl spells a fully qualified kind.
    name = text.strip().lower().split(".", 1)[0]
    kind = aliases(known).get(name)
    if kind is None:
        raise UserError(f"unknown resource kind {text!r}; known kinds: {', '.join(sorted(known))}")
    return kind
