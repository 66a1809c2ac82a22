"""kizuna's mesh-wide settings resource, ``kizuna.dev/v1alpha1 MeshConfig``: the subset of Istio's MeshConfig
(mesh/v1alpha1/config.proto) that kizuna applies, in Istio's field names.

Istio reads these from the ``istio`` ConfigMap in ``istio-system``; kizuna takes them as a resource applied
like any other (``kizuna apply -f mesh.yaml``), so a change is pushed live and persisted with the store. One
MeshConfig is meant per mesh; if several are applied, the first by (namespace, name) holds.
"""

from __future__ import annotations

from typing import Literal

from kizuna.api.fields import IstioModel

MESH_CONFIG_API = "kizuna.dev/v1alpha1"


class OutboundTrafficPolicy(IstioModel):
    """What sidecars do with traffic for destinations outside the registry."""

    mode: Literal["ALLOW_ANY", "REGISTRY_ONLY"] = "ALLOW_ANY"
    """ALLOW_ANY (Istio's default): pass it through to where the app meant to go (transparent capture).
    REGISTRY_ONLY: refuse it (HTTP 502 ``destination not in registry``, TCP closed)."""


class MeshConfigSpec(IstioModel):
    """Mesh-wide settings; unset fields keep Istio's defaults."""

    outbound_traffic_policy: OutboundTrafficPolicy = OutboundTrafficPolicy()
    trust_domain: str = ""
    """The mesh's trust domain (Istio's default ``cluster.local``). Like Istio's install-time MeshConfig it is
    read when the mesh starts (``kizuna up``, from the manifests it is given) and names every identity the CA
    signs; applying a different one later changes nothing until the next ``up``."""
