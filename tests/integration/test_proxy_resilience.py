"""Timeouts, retries, the keep-alive race, and config swaps under load, with real sockets on loopback."""

from __future__ import annotations

import http.client
import threading
import time
from collections import Counter

import pytest

from kizuna.proxyconfig.model import Cluster, RetryPolicy, Snapshot
from kizuna.testing.mesh import (
    LocalMesh,
    loopback_addresses,
    service_cluster,
    simple_virtual_host,
    two_hop_snapshots,
)

pytestmark = pytest.mark.integration


DEFAULT_RETRY = RetryPolicy()


def snapshot(version: str, cluster: Cluster, timeout: float | None = None,
             retry: RetryPolicy = DEFAULT_RETRY) -> Snapshot:
    service = cluster.service.split(".")[0]
    vh = simple_virtual_host(service, cluster.port, cluster.name, timeout=timeout, retry=retry)
    return Snapshot(version, virtual_hosts=(vh,), clusters=(cluster,))


def get(address: str, url: str, timeout: float = 10) -> tuple[int, str | None, bytes, str | None]:
    """One request through the outbound listener on ``address``: status, error header, body, x-upstream."""
    conn = http.client.HTTPConnection(address, 15001, timeout=timeout)
    try:
        conn.request("GET", url)
        response = conn.getresponse()
        return (response.status, response.getheader("x-kizuna-error"), response.read(),
                response.getheader("x-upstream"))
    finally:
        conn.close()


def test_route_timeout_gives_504(mesh: LocalMesh) -> None:
    addr, app_addr = loopback_addresses(2)
    app = mesh.upstream(app_addr, name="slow")
    cluster = service_cluster("slow", 80, [(app_addr, app.port)])
    sidecar = mesh.sidecar(addr, snapshot("1", cluster, timeout=0.3))
    start = time.monotonic()
    status, error, body, _ = get(addr, "http://slow/delay/3")
    assert (status, error, body) == (504, "upstream timeout", b"upstream timeout\n")
    assert time.monotonic() - start < 1.5
    assert sidecar.stats.timeouts == 1
    assert get(addr, "http://slow/bytes/2")[0] == 200  # a fast request on the same route is fine


def test_retries_hide_a_failing_endpoint(mesh: LocalMesh) -> None:
    addr, bad_addr, good_addr = loopback_addresses(3)
    bad = mesh.upstream(bad_addr, name="bad", status=503)
    good = mesh.upstream(good_addr, name="good")
    cluster = service_cluster("flaky", 80, [(bad_addr, bad.port), (good_addr, good.port)],
                              lb_policy="ROUND_ROBIN")
    sidecar = mesh.sidecar(addr, snapshot("1", cluster))  # Istio's default: 2 retries on 503
    results = [get(addr, "http://flaky/") for _ in range(20)]
    assert {(status, upstream) for status, _, _, upstream in results} == {(200, "good")}
    assert len(bad.requests) >= 5  # round robin sent first tries there; each was retried elsewhere
    assert sidecar.stats.retries == len(bad.requests)
    assert sidecar.stats.upstream_rq[cluster.name][4] == len(bad.requests)


def test_without_retries_the_failure_shows(mesh: LocalMesh) -> None:
    addr, bad_addr, good_addr = loopback_addresses(3)
    bad = mesh.upstream(bad_addr, name="bad", status=503)
    good = mesh.upstream(good_addr, name="good")
    cluster = service_cluster("flaky", 80, [(bad_addr, bad.port), (good_addr, good.port)],
                              lb_policy="ROUND_ROBIN")
    mesh.sidecar(addr, snapshot("1", cluster, retry=RetryPolicy(attempts=0)))
    statuses = Counter(get(addr, "http://flaky/")[0] for _ in range(10))
    assert statuses == {200: 5, 503: 5}


def test_retry_on_5xx_covers_other_codes_and_gives_up_after_the_attempts(mesh: LocalMesh) -> None:
    addr, app_addr = loopback_addresses(2)
    app = mesh.upstream(app_addr, name="broken", status=500)
    cluster = service_cluster("broken", 80, [(app_addr, app.port)])
    sidecar = mesh.sidecar(addr, snapshot("1", cluster, retry=RetryPolicy(attempts=3,
                                                                          retry_on=frozenset({"5xx"}))))
    status, error, _, upstream = get(addr, "http://broken/")
    assert (status, error, upstream) == (500, None, "broken")  # the last try's response goes to the client
    assert len(app.requests) == 4 and sidecar.stats.retries == 3


def test_per_try_timeout_moves_on_to_another_endpoint(mesh: LocalMesh) -> None:
    addr, slow_addr, fast_addr = loopback_addresses(3)
    slow = mesh.upstream(slow_addr, name="slow", delay=2.0)
    fast = mesh.upstream(fast_addr, name="fast")
    cluster = service_cluster("mixed", 80, [(slow_addr, slow.port), (fast_addr, fast.port)],
                              lb_policy="ROUND_ROBIN")
    retry = RetryPolicy(attempts=2, per_try_timeout=0.2, retry_on=frozenset({"gateway-error"}))
    mesh.sidecar(addr, snapshot("1", cluster, timeout=5.0, retry=retry))
    start = time.monotonic()
    results = [get(addr, "http://mixed/") for _ in range(4)]
    assert {(r[0], r[3]) for r in results} == {(200, "fast")}
    # Retries advance the round robin too, so most first tries land on the slow endpoint and time out.
    assert len(slow.requests) >= 3
    assert time.monotonic() - start < 1.5


def test_app_closing_a_pooled_connection_is_retried_on_a_fresh_one(mesh: LocalMesh) -> None:
    """Istio's "503 UC": the app drops an idle keep-alive connection just as the sidecar reuses it."""
    client_addr, server_addr, app_addr = loopback_addresses(3)
    app = mesh.upstream(app_addr, name="app", close_reused=True)
    client_snap, server_snap = two_hop_snapshots(client_addr, server_addr, app_addr, app.port, service="svc")
    server = mesh.sidecar(server_addr, server_snap)  # inbound: no retry policy at all
    mesh.sidecar(client_addr, client_snap)
    for _ in range(5):
        assert get(client_addr, "http://svc/bytes/4")[:3] == (200, None, b"xxxx")
    assert app.connections == 5
    assert server.stats.retries == 0 and server.stats.errors == {}


def test_config_swap_under_load_fails_no_request(mesh: LocalMesh) -> None:
    addr, a_addr, b_addr = loopback_addresses(3)
    a = mesh.upstream(a_addr, name="a")
    b = mesh.upstream(b_addr, name="b")
    to_a = snapshot("a", service_cluster("swap", 80, [(a_addr, a.port)]))
    to_b = snapshot("b", service_cluster("swap", 80, [(b_addr, b.port)]))
    sidecar = mesh.sidecar(addr, to_a)
    failures: list[object] = []
    served: Counter[str] = Counter()
    stop = threading.Event()

    def load() -> None:
        conn = http.client.HTTPConnection(addr, 15001, timeout=10)
        try:
            for _ in range(400):
                if stop.is_set():
                    break
                try:
                    conn.request("POST", "http://swap/post", body=b"payload")
                    response = conn.getresponse()
                    response.read()
                    if response.status != 200:
                        failures.append((response.status, response.getheader("x-kizuna-error")))
                    served[response.getheader("x-upstream") or "?"] += 1
                except (OSError, http.client.HTTPException) as exc:
                    failures.append(exc)
                    conn.close()
                    conn = http.client.HTTPConnection(addr, 15001, timeout=10)
        finally:
            conn.close()

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for i in range(20):
            time.sleep(0.02)
            mesh.apply(sidecar, to_b if i % 2 == 0 else to_a)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert failures == []
    assert served["a"] > 0 and served["b"] > 0
    assert sidecar.version == "a"


def test_reset_before_response_is_retried_when_the_policy_says_reset(mesh: LocalMesh) -> None:
    addr, bad_addr, good_addr = loopback_addresses(3)
    bad = mesh.upstream(bad_addr, name="bad", drop=True)
    good = mesh.upstream(good_addr, name="good")
    cluster = service_cluster("resets", 80, [(bad_addr, bad.port), (good_addr, good.port)],
                              lb_policy="ROUND_ROBIN")
    sidecar = mesh.sidecar(addr, snapshot("1", cluster, retry=RetryPolicy(retry_on=frozenset({"reset"}))))
    assert {get(addr, "http://resets/")[::3] for _ in range(6)} == {(200, "good")}
    assert sidecar.stats.retries >= 3
    # Istio's default policy does not retry a reset: the client sees why it failed.
    mesh.apply(sidecar, snapshot("2", cluster))
    results = {get(addr, "http://resets/")[:2] for _ in range(6)}
    assert results == {(200, None), (503, "upstream reset")}
