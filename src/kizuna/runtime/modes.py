"""Which mode ``kizuna up`` runs in: transparent (namespaces + iptables capture) or proxy (HTTP_PROXY).

``auto`` picks transparent where it can work: as root, on Linux, with ``ip`` and ``iptables`` installed. An
explicit ``--pod-cidr`` decides by its kind: a loopback range (``127.40.1.0/24``) is proxy mode's, any other
range is the namespaces' (transparent). When ``auto`` falls back for lack of a capability, the user is told why
in one line.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import sys

from kizuna.runtime.errors import UserError

MODES = ("auto", "transparent", "proxy")
TOOLS = ("ip", "iptables", "iptables-restore", "setpriv")


def missing_capability() -> str | None:
    """Why transparent mode cannot run here, or None when it can."""
    if not sys.platform.startswith("linux"):
        return f"transparent mode needs Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return "transparent mode needs root (network namespaces and iptables)"
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        return f"transparent mode needs {', '.join(missing)} on PATH"
    return None


def resolve_mode(requested: str, pod_cidr: str | None) -> tuple[str, str | None]:
    """``(mode, note)``: the mode to run and, when ``auto`` fell back to proxy mode, a one-line reason."""
    if requested not in MODES:
        raise UserError(f"--mode {requested}: choose one of {', '.join(MODES)}")
    if requested == "proxy":
        return "proxy", None
    reason = missing_capability()
    if requested == "transparent":
        if reason:
            raise UserError(reason)
        return "transparent", None
    if pod_cidr is not None:
        if _is_loopback_range(pod_cidr):
            return "proxy", None
        if reason:
            raise UserError(f"--pod-cidr {pod_cidr} is a range for network namespaces: {reason}")
        return "transparent", None
    if reason:
        return "proxy", f"kizuna: using proxy mode: {reason}"
    return "transparent", None


def _is_loopback_range(cidr: str) -> bool:
    try:
        network = ipaddress.ip_network(cidr, strict=False)
        return isinstance(network, ipaddress.IPv4Network) and network.subnet_of(ipaddress.IPv4Network("127.0.0.0/8"))
    except (ValueError, TypeError):
        return True  # not a range at all: proxy mode's parser says what is wrong with it
