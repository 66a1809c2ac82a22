"""Envoy response flags a user meets at a real sidecar: UC (the upstream went away), UH (no healthy upstream)
and NC (a route to a subset no DestinationRule defines), in the response, ``/stats`` and the access log.

Client → sidecar outbound (in-process, on loopback) → scripted apps; the NC test compiles its snapshots from
Istio YAML with the control plane's own compiler and checks ``kizuna explain`` tells the same story.
"""

from __future__ import annotations

import http.client
import json
import textwrap
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from tests.integration.h2_scripted import CLOSE, CUT, HALF, ScriptedH2, ScriptedHttp, h2_call

from kizuna.api import parse_all, parse_text
from kizuna.cli.explain import render
from kizuna.controlplane.compile import compile_snapshot
from kizuna.controlplane.instances import Instance
from kizuna.proxy.explain import explain
from kizuna.proxy.sidecar import Sidecar
from kizuna.proxyconfig.bootstrap import Node
from kizuna.proxyconfig.model import Cluster, RetryPolicy, Snapshot
from kizuna.proxyconfig.policy import OutlierDetection
from kizuna.testing.mesh import LocalMesh, loopback_addresses, service_cluster, sidecar_bootstrap, simple_virtual_host

pytestmark = pytest.mark.integration

BLOCK = "127.100"
NO_RETRY = RetryPolicy(attempts=0)


def snapshot(version: str, cluster: Cluster, retry: RetryPolicy = NO_RETRY) -> Snapshot:
    vh = simple_virtual_host(cluster.service.split(".")[0], cluster.port, cluster.name, retry=retry)
    return Snapshot(version, virtual_hosts=(vh,), clusters=(cluster,))


def request(address: str, url: str) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request through the outbound listener on ``address``: status, headers, body."""
    conn = http.client.HTTPConnection(address, 15001, timeout=20)
    try:
        conn.request("GET", url)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def logged_sidecar(mesh: LocalMesh, address: str, log: Path, snap: Snapshot) -> Sidecar:
    """A sidecar on ``address`` writing its access log to ``log``."""
    sidecar = Sidecar(replace(sidecar_bootstrap(f"sidecar-{address}.default", address), access_log=str(log)))
    mesh.loop.run(sidecar.start())
    mesh.sidecars.append(sidecar)
    mesh.apply(sidecar, snap)
    return sidecar


def access_log(log: Path, count: int) -> list[dict[str, Any]]:
    """The first ``count`` entries of an access log, once written (it is flushed about once a second)."""
    deadline = time.monotonic() + 10
    entries: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        entries = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        if len(entries) >= count:
            break
        time.sleep(0.1)
    return entries[:count]


# -- UC: upstream connection termination ---------------------------------------------------------------------


def test_upstream_closing_before_answering_is_503_uc(mesh: LocalMesh, tmp_path: Path) -> None:
    addr, app_addr = loopback_addresses(2, prefix=BLOCK)
    app = mesh.loop.run(ScriptedHttp(app_addr, name="app", script=[CLOSE]).start())
    mesh.servers.append(app)
    log = tmp_path / "access.log"
    sidecar = logged_sidecar(mesh, addr, log, snapshot("1", service_cluster("crashy", 80, [(app_addr, app.port)])))
    status, headers, body = request(addr, "http://crashy/")
    assert (status, headers["x-kizuna-flags"], headers["x-kizuna-error"]) == (503, "UC", "upstream reset")
    assert body == b"upstream reset\n"
    assert sidecar.stats.flags == {"UC": 1}
    (entry,) = access_log(log, 1)
    assert (entry["response_code"], entry["response_flags"]) == (503, "UC")


def test_upstream_closing_mid_response_cuts_the_client_off_and_counts_uc(mesh: LocalMesh, tmp_path: Path) -> None:
    addr, app_addr = loopback_addresses(2, prefix=BLOCK)
    app = mesh.loop.run(ScriptedHttp(app_addr, name="app", script=[HALF]).start())
    mesh.servers.append(app)
    log = tmp_path / "access.log"
    sidecar = logged_sidecar(mesh, addr, log, snapshot("1", service_cluster("halfway", 80, [(app_addr, app.port)])))
    conn = http.client.HTTPConnection(addr, 15001, timeout=20)
    try:
        conn.request("GET", "http://halfway/")
        response = conn.getresponse()
        assert response.status == 200  # the head had gone out: all the sidecar can do is cut the body short
        with pytest.raises((http.client.IncompleteRead, ConnectionError)):
            response.read()
    finally:
        conn.close()
    assert sidecar.stats.flags == {"UC": 1}  # the sidecar's doing, not a downstream disconnect (DC)
    (entry,) = access_log(log, 1)
    assert (entry["response_code"], entry["response_flags"]) == (200, "UC")
    assert request(addr, "http://halfway/")[0] == 200  # the next request is served as usual


def test_http2_upstream_reset_mid_response_resets_the_stream_and_counts_uc(mesh: LocalMesh) -> None:
    addr, app_addr = loopback_addresses(2, prefix=BLOCK)
    app = mesh.loop.run(ScriptedH2(app_addr, script=[CUT]).start())
    try:
        sidecar = mesh.sidecar(addr, snapshot("1", service_cluster("cut", 80, [(app_addr, app.port)])))
        answer = h2_call(addr, "cut")
        assert (answer.status, answer.reset) == (200, True)
        assert sidecar.stats.flags == {"UC": 1}
        answer = h2_call(addr, "cut")
        assert (answer.status, answer.body, answer.reset) == (200, b"ok", False)
    finally:
        mesh.loop.run(app.stop())


# -- UH: no healthy upstream ---------------------------------------------------------------------------------


def test_every_endpoint_ejected_is_503_no_healthy_upstream(mesh: LocalMesh) -> None:
    addr, app_addr = loopback_addresses(2, prefix=BLOCK)
    app = mesh.loop.run(ScriptedHttp(app_addr, name="app", script=[503]).start())
    mesh.servers.append(app)
    base = service_cluster("sick", 80, [(app_addr, app.port)])
    # One 5xx ejects; 100% may be ejected; Istio's default minHealthPercent 0 means no panic routing.
    cluster = replace(base, outlier_detection=OutlierDetection(consecutive_5xx=1, interval=30.0,
                                                               base_ejection_time=60.0, max_ejection_percent=100))
    sidecar = mesh.sidecar(addr, snapshot("1", cluster))
    status, headers, _ = request(addr, "http://sick/")
    assert (status, headers["x-upstream"]) == (503, "app")  # the app's own 503 ejects it
    status, headers, body = request(addr, "http://sick/")
    assert (status, headers["x-kizuna-flags"], body) == (503, "UH", b"no healthy upstream\n")
    answer = h2_call(addr, "sick")
    assert (answer.status, answer.headers["x-kizuna-flags"]) == (503, "UH")
    assert len(app.arrivals) == 1
    assert sidecar.stats.flags == {"UH": 2}


def test_a_cluster_without_endpoints_is_503_no_healthy_upstream(mesh: LocalMesh) -> None:
    (addr,) = loopback_addresses(1, prefix=BLOCK)
    sidecar = mesh.sidecar(addr, snapshot("1", service_cluster("nobody", 80, [])))
    status, headers, _ = request(addr, "http://nobody/")
    assert (status, headers["x-kizuna-error"], headers["x-kizuna-flags"]) == (503, "no healthy upstream", "UH")
    assert sidecar.stats.flags == {"UH": 1}


# -- NC: a route to a subset no DestinationRule defines ------------------------------------------------------

WEB = """\
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web}
spec:
  hosts: [web]
  http:
  - match: [{headers: {x-version: {exact: v1}}}]
    route: [{destination: {host: web, subset: v1}}]
  - route: [{destination: {host: web, subset: v2}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web}
spec:
  host: web
  subsets: [{name: v1, labels: {version: v1}}]
"""


def test_route_to_an_undefined_subset_is_503_cluster_not_found(mesh: LocalMesh) -> None:
    client_addr, pod_addr, web_addr = loopback_addresses(3, prefix=BLOCK)
    client = Node("sleep-0.default", "sleep", labels=(("app", "sleep"),), pod_address=client_addr,
                  mesh_address=client_addr)
    web = Node("web-v1-0.default", "web-v1", labels=(("app", "web"), ("version", "v1")), pod_address=pod_addr,
               mesh_address=web_addr, ports=(8080,))
    resources = parse_all(parse_text(textwrap.dedent(WEB), "web.yaml"))
    instances = [Instance(client, True), Instance(web, True)]
    mesh.upstream(pod_addr, 8080, name="web-v1")
    mesh.sidecar(web_addr, compile_snapshot(resources, instances, web, "1"), pod_address=pod_addr)
    snap = compile_snapshot(resources, instances, client, "1")
    sidecar = mesh.sidecar(client_addr, snap)

    status, headers, body = request(client_addr, "http://web/")
    reason = ("cluster not found: no DestinationRule defines subset v2 of web.default.svc.cluster.local")
    assert (status, headers["x-kizuna-flags"], headers["x-kizuna-error"]) == (503, "NC", reason)
    assert body == reason.encode() + b"\n"
    answer = h2_call(client_addr, "web")
    assert (answer.status, answer.headers["x-kizuna-flags"], answer.headers["x-kizuna-error"]) == (503, "NC", reason)
    assert sidecar.stats.flags == {"NC": 2}
    # The subset the rule defines is served.
    conn = http.client.HTTPConnection(client_addr, 15001, timeout=20)
    try:
        conn.request("GET", "http://web/", headers={"x-version": "v1"})
        response = conn.getresponse()
        response.read()
        assert (response.status, response.getheader("x-upstream")) == (200, "web-v1")
    finally:
        conn.close()

    # ``kizuna explain`` replays the same snapshot and says the same.
    result = explain(snap, "web", 80, "GET", "/", {})
    text = render(result, "sleep", "1")
    assert "no DestinationRule defines subset v2 -> 503 cluster not found (NC)" in text
    (destination,) = result.to_json()["destinations"]
    assert destination["undefinedSubset"] is True and destination["endpoints"] == []
