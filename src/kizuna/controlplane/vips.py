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
"""

from __future__ import annotations

import copy
import dataclasses
import ipaddress
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from kizuna.api.errors import ValidationError
from kizuna.api.validate import Resource
from kizuna.api.workloads import HEADLESS, ServiceSpec

FIELD = "spec.clusterIP"


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
        """``resources`` with every Service's clusterIP settled; raises ValidationError (nothing assigned)
        listing every Service whose clusterIP cannot be had."""
        owners: dict[str, tuple[str, str]] = {}
        previous: dict[tuple[str, str], str] = {}
        for resource in stored:
            if isinstance(resource.spec, ServiceSpec):
                ident = (resource.namespace, resource.name)
                previous[ident] = resource.spec.cluster_ip
                if resource.spec.virtual_ip:
                    owners[resource.spec.virtual_ip] = ident
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
            owners[wanted] = ident
            if wanted != spec.cluster_ip or spec.cluster_ips != [wanted]:
                out[position] = _with_ip(resource, wanted)
        free = self._free(owners)
        for position in pending:
            resource = out[position]
            ip = next(free, None)
            if ip is None:
                errors.append(_error(resource, f"no free address left in the service range {self.network}"))
                continue
            owners[ip] = (resource.namespace, resource.name)
            out[position] = _with_ip(resource, ip)
        if errors:
            raise ValidationError(errors)
        return out

    def _check(self, wanted: str, ident: tuple[str, str], before: str,
               owners: dict[str, tuple[str, str]]) -> str:
        address = ipaddress.IPv4Address(wanted)
        if address not in self.network or address in (self.network.network_address,
                                                        self.network.broadcast_address):
            return f"{wanted} is not in the service range {self.network}"
        if before and before != wanted:
            return f"may not change from {before} to {wanted} (immutable)"
        owner = owners.get(wanted)
        if owner is not None and owner != ident:
            return f"{wanted} is already allocated to Service {owner[0]}/{owner[1]}"
        return ""

    def _free(self, owners: dict[str, tuple[str, str]]) -> Iterator[str]:
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


def _error(resource: Resource, message: str) -> str:
    return f"{resource.source}: Service {resource.namespace}/{resource.name}: {FIELD}: {message}"
