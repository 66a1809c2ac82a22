"""Service virtual IPs: the control plane allocates ``spec.clusterIP`` from its service range, as Kubernetes does.

The allocation lives in the stored resource itself (its ``raw`` gains ``clusterIP`` and ``clusterIPs``), so it
survives restarts with the store, shows in ``kizuna get svc -o yaml``, and a re-apply of the same manifest
(which has no clusterIP) keeps the address: the allocator fills in what the stored copy has. Deleting the
Service frees its address, because the free set is always computed from what the store holds.

Rules (Kubernetes' ``ClusterIP`` allocator, reduced to one IPv4 range):

* no ``clusterIP`` → the stored one if the Service exists, else the lowest free address of the range (the
  network address and, for ranges with one, the broadcast address are never handed out);
* an explicit ``clusterIP`` must lie inside the range, must not belong to another Service, and must equal the
  stored one when the Service exists (the field is immutable);
* ``clusterIP: None`` is a headless Service: no address.

ServiceEntries get addresses too, as Istio's DNS proxy auto-allocates them (``status.addresses``, one per
host): an entry with no ``addresses`` of its own, for each host that is not a wildcard, unless its
``resolution`` is NONE (the app has resolved the address itself). That is what lets an app in a transparent
pod resolve an entry's host (``runtime/names.py`` writes them to the hosts file) and the sidecar route the
captured connection by address. Re-applying an entry keeps its hosts' addresses.
"""

from __future__ import annotations

import copy
import dataclasses
import ipaddress
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from kizuna.api.errors import ValidationError
from kizuna.api.serviceentry import ServiceEntrySpec
from kizuna.api.validate import Resource
from kizuna.api.workloads import HEADLESS, ServiceSpec
from kizuna.controlplane.compile_index import allocated_addresses

FIELD = "spec.clusterIP"


def wants_addresses(spec: ServiceEntrySpec) -> list[str]:
    """The hosts of an entry that get an auto-allocated address."""
    if spec.addresses or spec.resolution == "NONE":
        return []
    return [h for h in spec.hosts if not h.startswith("*")]


class VipAllocator:
    """Assigns VIPs from ``cidr`` to Services about to be applied, given the Services already stored."""

    def __init__(self, cidr: str) -> None:
        try:
            network = ipaddress.IPv4Network(cidr, strict=False)
        except ValueError as exc:
            raise ValueError(f"service CIDR {cidr!r} is not an IPv4 network: {exc}") from None
        if network.num_addresses < 4:
            raise ValueError(f"service CIDR {cidr} is too small (use a /30 or larger)")
        self.network = network

    def assign(self, resources: Sequence[Resource], stored: Iterable[Resource]) -> list[Resource]:
        """``resources`` with every Service's clusterIP and every ServiceEntry's auto-allocated addresses
        settled; raises ValidationError (nothing assigned) listing every Service whose clusterIP cannot be
        had. ``stored``: the Services and ServiceEntries the store holds."""
        owners: dict[str, str] = {}
        previous: dict[tuple[str, str], str] = {}
        entries: dict[tuple[str, str], dict[str, str]] = {}
        batch = {(r.kind, r.namespace, r.name) for r in resources}
        for resource in stored:
            if isinstance(resource.spec, ServiceEntrySpec):
                kept = allocated_addresses(resource)
                entries[(resource.namespace, resource.name)] = kept
                if ("ServiceEntry", resource.namespace, resource.name) not in batch:
                    for kept_ip in kept.values():
                        owners[kept_ip] = f"ServiceEntry {resource.namespace}/{resource.name}"
            elif isinstance(resource.spec, ServiceSpec):
                ident = (resource.namespace, resource.name)
                previous[ident] = resource.spec.cluster_ip
                if resource.spec.virtual_ip:
                    owners[resource.spec.virtual_ip] = _label(ident)
        # Addresses of Services re-applied in this batch stay theirs; nothing else may take them.
        out: list[Resource] = []
        errors: list[str] = []
        pending: list[int] = []
        for position, resource in enumerate(resources):
            out.append(resource)
            spec = resource.spec
            if not isinstance(spec, ServiceSpec):
                continue
            ident = (resource.namespace, resource.name)
            wanted, before = spec.cluster_ip, previous.get(ident, "")
            if wanted == HEADLESS:
                if before and before != HEADLESS:
                    errors.append(_error(resource, f"may not change from {before} to None (immutable)"))
                continue
            if not wanted:
                if before and before != HEADLESS:
                    out[position] = _with_ip(resource, before)
                else:
                    pending.append(position)
                continue
            problem = self._check(wanted, ident, before, owners)
            if problem:
                errors.append(_error(resource, problem))
                continue
            owners[wanted] = _label(ident)
            if wanted != spec.cluster_ip or spec.cluster_ips != [wanted]:
                out[position] = _with_ip(resource, wanted)
        free = self._free(owners)
        for position, resource in enumerate(out):
            if isinstance(resource.spec, ServiceEntrySpec):
                kept = entries.get((resource.namespace, resource.name), {})
                hosts = wants_addresses(resource.spec)
                given = {h: kept[h] for h in hosts if h in kept and kept[h] not in owners}
                for host in hosts:
                    if host not in given:
                        allocated = next(free, None)
                        if allocated is None:
                            errors.append(f"{resource.source}: ServiceEntry {resource.namespace}/{resource.name}:"
                                          f" hosts: no free address left in the service range {self.network}")
                            break
                        given[host] = allocated
                for taken in given.values():
                    owners[taken] = f"ServiceEntry {resource.namespace}/{resource.name}"
                out[position] = _with_addresses(resource, [h for h in hosts if h in given], given)
        for position in pending:
            resource = out[position]
            ip = next(free, None)
            if ip is None:
                errors.append(_error(resource, f"no free address left in the service range {self.network}"))
                continue
            owners[ip] = _label((resource.namespace, resource.name))
            out[position] = _with_ip(resource, ip)
        if errors:
            raise ValidationError(errors)
        return out

    def _check(self, wanted: str, ident: tuple[str, str], before: str,
               owners: dict[str, str]) -> str:
        address = ipaddress.IPv4Address(wanted)
        if address not in self.network or address in (self.network.network_address,
                                                        self.network.broadcast_address):
            return f"{wanted} is not in the service range {self.network}"
        if before and before != wanted:
            return f"may not change from {before} to {wanted} (immutable)"
        owner = owners.get(wanted)
        if owner is not None and owner != _label(ident):
            return f"{wanted} is already allocated to {owner}"
        return ""

    def _free(self, owners: dict[str, str]) -> Iterator[str]:
        for address in self.network.hosts():
            text = str(address)
            if text not in owners:
                yield text


def _with_ip(resource: Resource, ip: str) -> Resource:
    raw: dict[str, Any] = copy.deepcopy(resource.raw)
    spec = raw.setdefault("spec", {})
    spec["clusterIP"] = ip
    spec["clusterIPs"] = [ip]
    assert isinstance(resource.spec, ServiceSpec)
    typed = resource.spec.model_copy(update={"cluster_ip": ip, "cluster_ips": [ip]})
    return dataclasses.replace(resource, spec=typed, raw=raw)


def _label(ident: tuple[str, str]) -> str:
    return f"Service {ident[0]}/{ident[1]}"


def _with_addresses(resource: Resource, hosts: list[str], given: dict[str, str]) -> Resource:
    raw: dict[str, Any] = copy.deepcopy(resource.raw)
    status = raw.setdefault("status", {}) if hosts else raw.get("status") or {}
    if hosts:
        status["addresses"] = [{"value": given[h], "host": h} for h in hosts]
    elif "addresses" in status:
        del status["addresses"]
        if not status:
            raw.pop("status", None)
    return dataclasses.replace(resource, raw=raw)


def _error(resource: Resource, message: str) -> str:
    return f"{resource.source}: Service {resource.namespace}/{resource.name}: {FIELD}: {message}"
