"""DestinationRule fields end to end that were only unit-tested: ``maxRetries`` (retry overflow, flag UO),
``maxConnectionDuration``, ``consecutiveGatewayErrors`` and ``minHealthPercent``.

Snapshots are compiled from Istio YAML by the control plane's own ``compile_snapshot``; the client sidecar runs
in-process and dials the apps directly (each app listens on its instance's mesh address, port 8080).
"""

from __future__ import annotations

import http.client
import textwrap
import threading
import time
from collections import Counter
from dataclasses import dataclass

import pytest

from kizuna.api import Resource, parse_all, parse_text
from kizuna.controlplane.compile import compile_snapshot
from kizuna.controlplane.instances import Instance
from kizuna.proxy.sidecar import Sidecar
from kizuna.proxyconfig.bootstrap import Node
from kizuna.testing.mesh import LocalMesh, loopback_addresses
from kizuna.testing.upstream import UpstreamServer

pytestmark = pytest.mark.integration

BLOCK = "127.100"
SERVICE = """\
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
"""


def virtual_service(retries: str) -> str:
    return f"""\
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {{name: web}}
    spec:
      hosts: [web]
      http: [{{route: [{{destination: {{host: web}}}}], retries: {retries}}}]
    """


def destination_rule(policy: str) -> str:
    return f"""\
    apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: {{name: web}}
    spec:
      host: web
      trafficPolicy: {policy}
    """


@dataclass
class Mesh:
    local: LocalMesh
    client: Sidecar
    address: str
    apps: list[UpstreamServer]
    client_node: Node
    instances: list[Instance]

    def push(self, version: str, *texts: str) -> None:
        """Compile the client's snapshot from ``texts`` (with the Service) and apply it, as a push does."""
        self.local.apply(self.client, compile_snapshot(load(*texts), self.instances, self.client_node, version))

    def get(self, path: str = "/") -> tuple[int, str | None, str | None]:
        """One request to ``web``: status, x-upstream, x-kizuna-flags."""
        conn = http.client.HTTPConnection(self.address, 15001, timeout=30)
        try:
            conn.request("GET", f"http://web{path}")
            r = conn.getresponse()
            r.read()
            return r.status, r.getheader("x-upstream"), r.getheader("x-kizuna-flags")
        finally:
            conn.close()


def load(*texts: str) -> list[Resource]:
    return parse_all(parse_text("---\n".join(textwrap.dedent(t) for t in (SERVICE, *texts)), "web.yaml"))


def start(local: LocalMesh, apps: list[dict[str, object]], *texts: str) -> Mesh:
    """A client sidecar for ``web`` whose instances are the apps with ``apps`` options."""
    addresses = loopback_addresses(1 + len(apps), prefix=BLOCK)
    client = Node("sleep-0.default", "sleep", labels=(("app", "sleep"),), pod_address=addresses[0],
                  mesh_address=addresses[0])
    nodes = [Node(f"web-{i}.default", "web", labels=(("app", "web"),), pod_address=a, mesh_address=a, ports=(8080,))
             for i, a in enumerate(addresses[1:])]
    instances = [Instance(client, True)] + [Instance(n, True) for n in nodes]
    servers = [local.upstream(n.mesh_address, 8080, **options) for n, options in zip(nodes, apps, strict=True)]
    sidecar = local.sidecar(client.mesh_address, compile_snapshot(load(*texts), instances, client, "1"))
    return Mesh(local, sidecar, client.mesh_address, servers, client, instances)


def test_max_retries_outstanding_pass_the_next_failure_on_as_uo(mesh: LocalMesh) -> None:
    """``maxRetries: 1``: while one request is retrying, another request's failure is not retried (Envoy's
    retry overflow) and reaches its client flagged UO."""
    m = start(mesh, [{"name": "down", "status": 503}], virtual_service("{attempts: 8, retryOn: 5xx}"),
              destination_rule("{connectionPool: {http: {maxRetries: 1}}}"))
    app = m.apps[0]
    first: list[tuple[int, str | None, str | None]] = []
    retrying = threading.Thread(target=lambda: first.append(m.get()))
    retrying.start()
    try:
        deadline = time.monotonic() + 10
        while len(app.requests) < 2 and time.monotonic() < deadline:  # its first retry went out
            time.sleep(0.005)
        # Eight retries back off for 1.3 s at least: this request fails while the first is still retrying.
        assert m.get() == (503, "down", "UO")
    finally:
        retrying.join(30)
    assert first == [(503, "down", "URX")]  # the first spent its retries
    assert len(app.requests) == 10  # 1 + 8 tries, and 1 try of the overflowed request
    assert m.client.stats.flags == {"UO": 1, "URX": 1}


def test_max_connection_duration_replaces_an_upstream_connection_at_that_age(mesh: LocalMesh) -> None:
    m = start(mesh, [{"name": "app"}], virtual_service("{attempts: 0}"),
              destination_rule("{connectionPool: {tcp: {maxConnectionDuration: 2s}}}"))
    app = m.apps[0]
    started = time.monotonic()
    assert m.get()[0] == 200 and m.get()[0] == 200
    young = time.monotonic() - started
    time.sleep(max(0.0, started + 2.5 - time.monotonic()))
    assert m.get()[0] == 200
    assert young < 1.5 and app.connections == 2  # the first two shared one; the third needed a new one


def test_consecutive_gateway_errors_eject_on_502_503_504_only(mesh: LocalMesh) -> None:
    m = start(mesh, [{"name": "gateway", "status": 502}, {"name": "broken", "status": 500}, {"name": "good"}],
              virtual_service("{attempts: 0}"),
              destination_rule("{loadBalancer: {simple: ROUND_ROBIN}, outlierDetection: {consecutiveGatewayErrors: 2,"
                               " consecutive5xxErrors: 0, interval: 30s, baseEjectionTime: 60s,"
                               " maxEjectionPercent: 100}}"))
    results = [m.get() for _ in range(15)]
    by_status = Counter(status for status, _, _ in results)
    assert by_status[502] == 2  # the second consecutive gateway error ejected it
    assert by_status[500] >= 5  # a 500 is no gateway error: never ejected
    assert all(status != 502 for status, _, _ in results[-6:])


def test_below_min_health_percent_ejections_are_ignored(mesh: LocalMesh) -> None:
    rule = ("{{loadBalancer: {{simple: ROUND_ROBIN}}, outlierDetection: {{consecutive5xxErrors: 1, interval: 30s,"
            " baseEjectionTime: 60s, maxEjectionPercent: 100{}}}}}")
    m = start(mesh, [{"name": "bad", "status": 503}, {"name": "good"}], virtual_service("{attempts: 0}"),
              destination_rule(rule.format(", minHealthPercent: 60")))
    # One of two ejected leaves 50% healthy, below 60%: Envoy's panic mode balances over both anyway.
    assert Counter(m.get()[0] for _ in range(10)) == {200: 5, 503: 5}
    # Istio's default minHealthPercent 0: the ejection holds (a new snapshot starts detection afresh).
    m.push("2", virtual_service("{attempts: 0}"), destination_rule(rule.format("")))
    assert Counter(m.get()[0] for _ in range(10)) == {200: 9, 503: 1}
