"""Service names inside the namespaces: a per-namespace ``/etc/hosts`` and ``resolv.conf``.

``ip netns exec NS`` bind-mounts ``/etc/netns/NS/<file>`` over ``/etc/<file>`` for the command it runs, so
every process of an instance sees that instance's files. Services resolve to their VIP under the same four
names as on Kubernetes (``svc``, ``svc.ns``, ``svc.ns.svc``, ``svc.ns.svc.cluster.local``); short names are
written for the instance's own namespace only, as a cluster's search path would make them resolve.
ServiceEntry hosts resolve as Istio's DNS proxy makes them: to the entry's own address, or the one the control
plane allocated (``status.addresses``).

The files are rewritten in place (same inode) because a bind mount pins the inode: a renamed-over file would
never be seen by running processes. glibc reads ``/etc/hosts`` on every lookup, so a Service applied later
resolves in apps that are already running.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kizuna.runtime.netns import ETC_NETNS

CLUSTER_DOMAIN = "cluster.local"
RESOLV_CONF = ("# kizuna transparent mode: Service names come from /etc/hosts in this namespace.\n"
               "options ndots:1\n")


@dataclass(frozen=True, slots=True)
class ServiceVip:
    """A Service and its cluster IP."""

    name: str
    namespace: str
    cluster_ip: str


def vips_of(services: Iterable[Mapping[str, Any]]) -> list[ServiceVip]:
    """Services (raw resources, as ``ControlPlaneClient.get("Service")`` returns them) that have a VIP."""
    found = []
    for raw in services:
        meta, spec = raw.get("metadata") or {}, raw.get("spec") or {}
        ip = str(spec.get("clusterIP") or "")
        if ip and ip.lower() != "none":
            found.append(ServiceVip(str(meta.get("name", "")), str(meta.get("namespace") or "default"), ip))
    return sorted(found, key=lambda s: (s.namespace, s.name))


def entry_addresses(entries: Iterable[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """(address, host) of ServiceEntries (raw resources): each host at the entry's first single address,
    else at its allocated one; wildcard hosts and hosts with neither are left to the resolver."""
    found = []
    for raw in entries:
        spec, status = raw.get("spec") or {}, raw.get("status") or {}
        own = [str(a) for a in spec.get("addresses") or () if "/" not in str(a) or str(a).endswith("/32")]
        allocated = {str(a.get("host")): str(a.get("value")) for a in status.get("addresses") or ()
                     if isinstance(a, Mapping)}
        for host in spec.get("hosts") or ():
            address = own[0].split("/")[0] if own else allocated.get(str(host))
            if address and not str(host).startswith("*"):
                found.append((address, str(host)))
    return sorted(set(found), key=lambda e: (e[1], e[0]))


def hosts_text(hostname: str, pod_ip: str, namespace: str, services: Iterable[ServiceVip],
               entries: Iterable[tuple[str, str]] = ()) -> str:
    """The ``/etc/hosts`` of an instance called ``hostname`` at ``pod_ip`` in ``namespace``; ``entries``:
    (address, host) of ServiceEntry hosts."""
    lines = ["# written by kizuna; rewritten when Services change", "127.0.0.1\tlocalhost",
             "::1\tlocalhost ip6-localhost ip6-loopback", f"{pod_ip}\t{hostname}"]
    lines += [f"{address}\t{host}" for address, host in entries]
    for svc in services:
        fqdn = f"{svc.name}.{svc.namespace}.svc.{CLUSTER_DOMAIN}"
        names = [fqdn, f"{svc.name}.{svc.namespace}.svc", f"{svc.name}.{svc.namespace}"]
        if svc.namespace == namespace:
            names.append(svc.name)
        lines.append(f"{svc.cluster_ip}\t{' '.join(names)}")
    return "\n".join(lines) + "\n"


def etc_dir(netns: str) -> Path:
    return ETC_NETNS / netns


def write_in_place(path: Path, text: str) -> None:
    """Replace ``path``'s content keeping its inode (a bind mount of it stays valid)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    with os.fdopen(fd, "r+") as f:
        f.seek(0)
        f.write(text)
        f.truncate()


def write_files(netns: str, hostname: str, pod_ip: str, namespace: str, services: Iterable[ServiceVip],
                entries: Iterable[tuple[str, str]] = ()) -> None:
    """Create or refresh ``/etc/netns/<netns>/{hosts,resolv.conf}``."""
    directory = etc_dir(netns)
    directory.mkdir(parents=True, exist_ok=True)
    write_in_place(directory / "hosts", hosts_text(hostname, pod_ip, namespace, services, entries))
    write_in_place(directory / "resolv.conf", RESOLV_CONF)
