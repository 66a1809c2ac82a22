"""What kube-proxy does for a pod without a sidecar: connections to a Service VIP go to one ready endpoint.

Only namespaces of instances with ``sidecar.istio.io/inject: "false"`` get these rules (sidecar'd pods send VIP
traffic to their sidecar instead). As kube-proxy's iptables mode: one chain per Service port, endpoints picked
with ``-m statistic --mode random --probability 1/(n-i)`` so each of n endpoints gets an equal share, DNAT to
``pod_ip:targetPort`` in the nat OUTPUT chain of the client's namespace. The text replaces the namespace's
whole nat table, so a refresh is one atomic ``iptables-restore``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class ServicePortEndpoints:
    """One Service port at its VIP and the ready endpoints (``ip:port``) behind it."""

    name: str
    vip: str
    port: int
    endpoints: tuple[str, ...]


def service_endpoints(services: Iterable[Mapping[str, Any]], registry: Mapping[str, Any],
                      named_ports: Mapping[tuple[str, str], Mapping[str, int]] | None = None
                      ) -> list[ServicePortEndpoints]:
    """Join Services (raw resources with ``spec.clusterIP``) with the registry's ready instances.

    ``named_ports`` maps ``(namespace, instance id)`` to the container ports by name, to resolve a named
    ``targetPort``; a name that does not resolve leaves that instance out, as Kubernetes does.
    """
    named_ports = named_ports or {}
    members = {(s.get("namespace", "default"), s.get("name")): s.get("instances", [])
               for s in registry.get("services", [])}
    out = []
    for raw in services:
        meta, spec = raw.get("metadata") or {}, raw.get("spec") or {}
        vip = str(spec.get("clusterIP") or "")
        if not vip or vip.lower() == "none":
            continue
        key = (str(meta.get("namespace") or "default"), str(meta.get("name", "")))
        ready = [i for i in members.get(key, []) if i.get("ready")]
        for port in spec.get("ports") or []:
            if str(port.get("protocol", "TCP")) != "TCP":
                continue
            target = port.get("targetPort", port["port"])
            endpoints = []
            for inst in ready:
                number = target if isinstance(target, int) else named_ports.get(
                    (key[0], str(inst.get("id"))), {}).get(str(target))
                if number is not None:
                    endpoints.append(f"{inst['address']}:{number}")
            out.append(ServicePortEndpoints(f"{key[0]}/{key[1]}:{port['port']}", vip, int(port["port"]),
                                            tuple(sorted(endpoints))))
    return out


def dnat_rules(ports: Sequence[ServicePortEndpoints]) -> str:
    """``iptables-restore`` text for the nat table of a namespace without a sidecar."""
    chains = [f"KZ_SVC_{i}" for i in range(len(ports))]
    lines = ["*nat", ":PREROUTING ACCEPT [0:0]", ":INPUT ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]",
             ":POSTROUTING ACCEPT [0:0]", ":KZ_SERVICES - [0:0]", *(f":{c} - [0:0]" for c in chains),
             "-A OUTPUT -j KZ_SERVICES"]
    for chain, svc in zip(chains, ports, strict=True):
        if not svc.endpoints:
            continue  # no ready endpoint: the connection fails, as on Kubernetes (there it is rejected)
        lines.append(f"-A KZ_SERVICES -d {svc.vip}/32 -p tcp --dport {svc.port} "
                     f"-m comment --comment \"{svc.name}\" -j {chain}")
        n = len(svc.endpoints)
        for i, endpoint in enumerate(svc.endpoints):
            pick = "" if i == n - 1 else f"-m statistic --mode random --probability {1 / (n - i):.11f} "
            lines.append(f"-A {chain} -p tcp {pick}-j DNAT --to-destination {endpoint}")
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"
