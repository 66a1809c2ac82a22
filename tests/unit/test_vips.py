"""Service VIP allocation: what ``kizuna apply`` of a Service does to its ``spec.clusterIP`` when the control
plane runs with a service range, through the control plane's real API handler and persisted store."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from kizuna.controlplane.httpserver import Request
from kizuna.controlplane.push import PushQueue
from kizuna.controlplane.registry import Registry
from kizuna.controlplane.server import ControlPlaneServer
from kizuna.controlplane.store import FileStore
from kizuna.controlplane.vips import VipAllocator

TOKEN = "t" * 32
CIDR = "10.96.0.0/29"  # hosts .1 to .6


def service(name: str, cluster_ip: str | None = None, namespace: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"selector": {"app": name}, "ports": [{"port": 80}]}
    if cluster_ip is not None:
        spec["clusterIP"] = cluster_ip
    meta: dict[str, Any] = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": spec}


class ControlPlane:
    """The API handler over a store in ``state``; a new instance over the same dir is a restarted one."""

    def __init__(self, state: Path, cidr: str | None = CIDR) -> None:
        store: FileStore[Any] = FileStore(state)
        registry = Registry()
        self.server = ControlPlaneServer(TOKEN, store, registry, PushQueue(store, registry),
                                         vips=VipAllocator(cidr) if cidr else None)

    def call(self, path: str, resources: list[dict[str, Any]], method: str = "POST",
             query: dict[str, list[str]] | None = None) -> tuple[int, Any]:
        body = json.dumps({"documents": [{"source": "svc.yaml", "index": i, "resource": r}
                                         for i, r in enumerate(resources)]}).encode()
        request = Request(method, path, query or {}, {"authorization": f"Bearer {TOKEN}"},
                          body if method == "POST" else b"")
        response = asyncio.run(self.server.handle(request))
        return response.status, json.loads(response.body)  # type: ignore[union-attr]

    def apply(self, *resources: dict[str, Any]) -> tuple[int, Any]:
        return self.call("/v1/apply", list(resources))

    def cluster_ip(self, name: str) -> Any:
        status, body = self.call("/v1/resources", [], "GET", {"kind": ["Service"], "name": [name]})
        assert status == 200
        spec = body["items"][0]["spec"]
        assert spec.get("clusterIPs", [spec.get("clusterIP")]) == [spec.get("clusterIP")]
        return spec.get("clusterIP")


def test_services_get_the_next_free_address_and_keep_it_on_reapply_and_restart(tmp_path: Path) -> None:
    cp = ControlPlane(tmp_path)
    status, body = cp.apply(service("a"), service("b"))
    assert status == 200, body
    assert (cp.cluster_ip("a"), cp.cluster_ip("b")) == ("10.96.0.1", "10.96.0.2")
    # Re-applying the same manifest (no clusterIP in it) keeps the address and changes nothing.
    status, body = cp.apply(service("a"))
    assert status == 200 and body["results"][0]["action"] == "unchanged"
    restarted = ControlPlane(tmp_path)
    assert restarted.cluster_ip("a") == "10.96.0.1"
    status, body = restarted.apply(service("c"), service("a"))
    assert status == 200, body
    assert (restarted.cluster_ip("c"), restarted.cluster_ip("a")) == ("10.96.0.3", "10.96.0.1")


def test_delete_frees_the_address(tmp_path: Path) -> None:
    cp = ControlPlane(tmp_path)
    cp.apply(service("a"), service("b"))
    status, body = cp.call("/v1/delete", [service("a")])
    assert status == 200 and body["results"][0]["action"] == "deleted"
    cp.apply(service("c"))
    assert cp.cluster_ip("c") == "10.96.0.1"


@pytest.mark.parametrize(("cluster_ip", "message"), [
    ("10.97.0.1", "10.97.0.1 is not in the service range 10.96.0.0/29"),
    ("10.96.0.0", "is not in the service range"),  # the network address is never handed out
    ("10.96.0.2", "10.96.0.2 is already allocated to Service default/b"),
    ("banana", "is not an IPv4 address"),
])
def test_explicit_cluster_ip_outside_the_range_or_taken_is_rejected(tmp_path: Path, cluster_ip: str,
                                                                    message: str) -> None:
    cp = ControlPlane(tmp_path)
    cp.apply(service("a"), service("b"))
    status, body = cp.apply(service("c", cluster_ip), service("d"))
    assert status == 422, body
    assert len(body["errors"]) == 1
    assert body["errors"][0].startswith("svc.yaml: Service default/c: spec.clusterIP: ")
    assert message in body["errors"][0]
    # All or nothing: d was not created either.
    status, body = cp.call("/v1/resources", [], "GET", {"kind": ["Service"]})
    assert [item["metadata"]["name"] for item in body["items"]] == ["a", "b"]


def test_explicit_free_address_is_kept_and_skipped_by_allocation(tmp_path: Path) -> None:
    cp = ControlPlane(tmp_path)
    status, body = cp.apply(service("a", "10.96.0.1"), service("b"))
    assert status == 200, body
    assert (cp.cluster_ip("a"), cp.cluster_ip("b")) == ("10.96.0.1", "10.96.0.2")
    status, body = cp.apply(service("a", "10.96.0.5"))
    assert status == 422 and "may not change from 10.96.0.1 to 10.96.0.5" in body["errors"][0]


def test_headless_service_gets_no_address(tmp_path: Path) -> None:
    cp = ControlPlane(tmp_path)
    status, body = cp.apply(service("h", "None"), service("a"))
    assert status == 200, body
    assert (cp.cluster_ip("h"), cp.cluster_ip("a")) == ("None", "10.96.0.1")


def test_the_range_running_out_is_a_validation_error(tmp_path: Path) -> None:
    cp = ControlPlane(tmp_path)
    status, body = cp.apply(*[service(f"s{i}") for i in range(7)])
    assert status == 422
    assert body["errors"] == ["svc.yaml: Service default/s6: spec.clusterIP: no free address left in the "
                              "service range 10.96.0.0/29"]


def test_same_name_in_two_namespaces_gets_two_addresses(tmp_path: Path) -> None:
    cp = ControlPlane(tmp_path)
    status, body = cp.apply(service("a"), service("a", namespace="other"))
    assert status == 200, body
    status, body = cp.call("/v1/resources", [], "GET", {"kind": ["Service"], "name": ["a"]})
    assert sorted(item["spec"]["clusterIP"] for item in body["items"]) == ["10.96.0.1", "10.96.0.2"]


def test_without_a_service_range_nothing_is_allocated(tmp_path: Path) -> None:
    cp = ControlPlane(tmp_path, cidr=None)
    status, body = cp.apply(service("a"))
    assert status == 200, body
    assert cp.cluster_ip("a") is None


def test_bad_service_range_is_refused() -> None:
    with pytest.raises(ValueError, match="not an IPv4 network"):
        VipAllocator("10.96.0.0/33")
    with pytest.raises(ValueError, match="too small"):
        VipAllocator("10.96.0.0/31")


def entry(name: str, hosts: list[str], addresses: list[str] | None = None,
          resolution: str = "DNS") -> dict[str, Any]:
    spec: dict[str, Any] = {"hosts": hosts, "ports": [{"number": 80, "name": "http", "protocol": "HTTP"}],
                            "resolution": resolution}
    if addresses is not None:
        spec["addresses"] = addresses
    return {"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry", "metadata": {"name": name},
            "spec": spec}


def allocated(cp: ControlPlane, name: str) -> Any:
    status, body = cp.call("/v1/resources", [], "GET", {"kind": ["ServiceEntry"], "name": [name]})
    assert status == 200
    return {a["host"]: a["value"] for a in (body["items"][0].get("status") or {}).get("addresses", [])}


def test_service_entry_hosts_get_addresses_like_istio_auto_allocation(tmp_path: Path) -> None:
    cp = ControlPlane(tmp_path)
    status, body = cp.apply(service("a"), entry("ext", ["api.example.com", "db.example.com"]),
                            entry("own", ["own.example.com"], addresses=["10.96.0.5"]),
                            entry("none", ["none.example.com"], resolution="NONE"))
    assert status == 200, body
    got = allocated(cp, "ext")
    # One address per host, none taken twice, none for entries with their own or NONE.
    assert set(got) == {"api.example.com", "db.example.com"}
    assert len({*got.values(), cp.cluster_ip("a")}) == 3
    assert allocated(cp, "own") == {} and allocated(cp, "none") == {}
    # Re-applying (no status in the manifest) keeps the addresses and changes nothing; so does a restart.
    status, body = cp.apply(entry("ext", ["api.example.com", "db.example.com"]))
    assert status == 200 and body["results"][0]["action"] == "unchanged", body
    restarted = ControlPlane(tmp_path)
    status, body = restarted.apply(service("b"))
    assert status == 200
    assert allocated(restarted, "ext") == got and restarted.cluster_ip("b") not in got.values()


def test_entry_hosts_resolve_in_the_pod_hosts_file() -> None:
    from kizuna.runtime.names import entry_addresses, hosts_text

    entries = entry_addresses([
        {"spec": {"hosts": ["api.example.com", "*.x.com"]},
         "status": {"addresses": [{"host": "api.example.com", "value": "10.96.0.3"}]}},
        {"spec": {"hosts": ["own.example.com"], "addresses": ["10.96.0.9/32"]}},
        {"spec": {"hosts": ["cidr.example.com"], "addresses": ["10.1.0.0/16"]}}])
    assert entries == [("10.96.0.3", "api.example.com"), ("10.96.0.9", "own.example.com")]
    text = hosts_text("sleep-1", "10.210.0.2", "default", [], entries)
    assert "10.96.0.3\tapi.example.com\n" in text and "own.example.com" in text and "cidr" not in text
