"""Why a proxy is not serving yet, read from the control plane's status of it: one wording for ``kizuna up``'s
instances, the ingress gateway and ``kizuna scale``."""

from __future__ import annotations

from typing import Any


def not_ready_reason(proxy: dict[str, Any] | None, subject: str, app: bool = True) -> str | None:
    """A clause saying why ``subject`` ("its sidecar", "the ingress gateway") does not run the latest config
    yet, or (``app``) why its app is not ready; None when it is ready. ``proxy``: its entry in the control
    plane's status (None: it never registered)."""
    if proxy is None:
        return f"{subject} never reached the control plane"
    if not proxy.get("connected"):
        return f"{subject} is not connected"
    if proxy.get("error"):
        return f"{subject} has no config: the control plane cannot compile it: {proxy['error']}"
    if proxy.get("nack"):
        return f"{subject} rejected its config: {proxy['nack']}"
    if app and not proxy.get("ready"):
        return "the app is not ready: its readiness probe fails"
    if not proxy.get("synced", True):
        return f"{subject} has not acknowledged the latest config"
    return None
