"""What the registry knows of one workload instance: its sidecar's node and whether the app is ready."""

from __future__ import annotations

from dataclasses import dataclass

from kizuna.proxyconfig.bootstrap import Node


@dataclass(frozen=True)
class Instance:
    """A registered workload instance. Only ready instances become endpoints of the services selecting it."""

    node: Node
    ready: bool
