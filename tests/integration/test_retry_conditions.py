"""Istio's retryOn conditions at a real sidecar, HTTP/1.1 and HTTP/2: retriable-4xx, numeric status codes,
refused-stream, the gRPC statuses, the jittered exponential backoff, and no retry once a body streamed.

Client → sidecar outbound (in-process, on loopback) → a scripted app that fails its first requests as told.
"""

from __future__ import annotations

import http.client
from collections.abc import Iterator

import pytest
from tests.integration.h2_scripted import REFUSE, ScriptedH2, ScriptedHttp, h2_call

from kizuna.api.virtualservice import HTTPRetry
from kizuna.controlplane.compile_routes import retry_policy
from kizuna.proxyconfig.model import Cluster, RetryPolicy, Snapshot
from kizuna.testing.mesh import LocalMesh, loopback_addresses, service_cluster, simple_virtual_host

pytestmark = pytest.mark.integration

BLOCK = "127.100"
BIG = 200 * 1024
"""A request body well past the 64 KiB a sidecar keeps for a replay."""
GRPC = (("content-type", "application/grpc"), ("te", "trailers"))
GRPC_MESSAGE = b"\x00\x00\x00\x00\x02hi"


def snapshot(version: str, cluster: Cluster, retry: RetryPolicy) -> Snapshot:
    vh = simple_virtual_host(cluster.service.split(".")[0], cluster.port, cluster.name, retry=retry)
    return Snapshot(version, virtual_hosts=(vh,), clusters=(cluster,))


def on(*conditions: str, attempts: int = 2) -> RetryPolicy:
    return RetryPolicy(attempts=attempts, retry_on=frozenset(conditions), retriable_status_codes=frozenset())


def request(address: str, url: str, method: str = "GET", body: bytes | None = None
            ) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request through the outbound listener on ``address``: status, headers, body."""
    conn = http.client.HTTPConnection(address, 15001, timeout=20)
    try:
        conn.request(method, url, body=body)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


@pytest.fixture
def h2apps(mesh: LocalMesh) -> Iterator[list[ScriptedH2]]:
    """h2c apps a test starts (append them); stopped after the test."""
    apps: list[ScriptedH2] = []
    try:
        yield apps
    finally:
        for app in apps:
            mesh.loop.run(app.stop())


def http_app(mesh: LocalMesh, address: str, script: list[int]) -> ScriptedHttp:
    app = mesh.loop.run(ScriptedHttp(address, name="app", script=script).start())
    mesh.servers.append(app)
    return app


def h2_app(mesh: LocalMesh, apps: list[ScriptedH2], address: str, script: list[object]) -> ScriptedH2:
    app = mesh.loop.run(ScriptedH2(address, name="h2app", script=list(script)).start())
    apps.append(app)
    return app


# -- HTTP/1.1 ------------------------------------------------------------------------------------------------


def test_retriable_4xx_retries_a_conflict_and_nothing_else(mesh: LocalMesh) -> None:
    addr, app_addr = loopback_addresses(2, prefix=BLOCK)
    app = http_app(mesh, app_addr, [409])
    cluster = service_cluster("orders", 80, [(app_addr, app.port)])
    sidecar = mesh.sidecar(addr, snapshot("1", cluster, on("retriable-4xx")))
    status, headers, _ = request(addr, "http://orders/")
    assert (status, headers["x-upstream"]) == (200, "app")
    assert len(app.arrivals) == 2 and sidecar.stats.retries == 1
    app.script[:] = [404]  # other 4xx would fail again: passed on at once
    assert request(addr, "http://orders/")[0] == 404
    assert len(app.arrivals) == 3 and sidecar.stats.retries == 1
    app.script[:] = [409, 409, 409]  # retries spent: the last conflict goes to the client, flagged URX
    status, headers, body = request(addr, "http://orders/")
    assert (status, headers.get("x-kizuna-flags"), body) == (409, "URX", b"app says 409\n")
    assert len(app.arrivals) == 6
    # Istio's default retryOn has no retriable-4xx: a conflict is the client's to handle.
    mesh.apply(sidecar, snapshot("2", cluster, RetryPolicy()))
    app.script[:] = [409]
    assert request(addr, "http://orders/")[0] == 409
    assert len(app.arrivals) == 7


def test_a_numeric_retry_on_entry_retries_that_status_only(mesh: LocalMesh) -> None:
    """Istio: a valid HTTP status in retryOn is added to the retriable status codes."""
    addr, app_addr = loopback_addresses(2, prefix=BLOCK)
    app = http_app(mesh, app_addr, [502])
    cluster = service_cluster("codes", 80, [(app_addr, app.port)])
    policy = retry_policy(HTTPRetry.model_validate({"attempts": 2, "retryOn": "connect-failure,502"}))
    sidecar = mesh.sidecar(addr, snapshot("1", cluster, policy))
    assert request(addr, "http://codes/")[0] == 200
    assert len(app.arrivals) == 2 and sidecar.stats.retries == 1
    app.script[:] = [503]  # not named: retryOn replaces Istio's default (which would retry a 503)
    assert request(addr, "http://codes/")[0] == 503
    assert len(app.arrivals) == 3 and sidecar.stats.retries == 1


def test_retries_back_off_exponentially_from_25ms(mesh: LocalMesh) -> None:
    addr, app_addr = loopback_addresses(2, prefix=BLOCK)
    app = http_app(mesh, app_addr, [503, 503, 503])
    cluster = service_cluster("backoff", 80, [(app_addr, app.port)])
    mesh.sidecar(addr, snapshot("1", cluster, on("5xx", attempts=3)))
    assert request(addr, "http://backoff/")[0] == 200
    t = app.arrivals
    gaps = [b - a for a, b in zip(t, t[1:], strict=False)]
    assert len(gaps) == 3
    # 25-50 ms, 50-100 ms, 100-200 ms after each failure (1 ms slack for the loop's millisecond clock); the
    # upper bound only guards against a runaway, so it is generous for a loaded machine.
    for gap, floor in zip(gaps, (0.025, 0.05, 0.1), strict=True):
        assert floor - 0.001 <= gap < floor * 2 + 1.5, gaps


def test_retries_back_off_from_the_routes_own_base_interval(mesh: LocalMesh) -> None:
    """HTTPRetry ``backoff`` sets the base interval: 200 ms, then 400 ms."""
    addr, app_addr = loopback_addresses(2, prefix=BLOCK)
    app = http_app(mesh, app_addr, [503, 503])
    cluster = service_cluster("slowback", 80, [(app_addr, app.port)])
    policy = retry_policy(HTTPRetry.model_validate({"attempts": 2, "retryOn": "5xx", "backoff": "200ms"}))
    mesh.sidecar(addr, snapshot("1", cluster, policy))
    assert request(addr, "http://slowback/")[0] == 200
    t = app.arrivals
    gaps = [b - a for a, b in zip(t, t[1:], strict=False)]
    assert len(gaps) == 2
    for gap, floor in zip(gaps, (0.2, 0.4), strict=True):
        assert floor - 0.001 <= gap < floor * 2 + 1.5, gaps


def test_a_body_streamed_past_the_replay_bound_is_tried_once(mesh: LocalMesh) -> None:
    addr, app_addr = loopback_addresses(2, prefix=BLOCK)
    app = http_app(mesh, app_addr, [503])
    cluster = service_cluster("upload", 80, [(app_addr, app.port)])
    sidecar = mesh.sidecar(addr, snapshot("1", cluster, RetryPolicy()))  # Istio's default retries a 503
    status, headers, _ = request(addr, "http://upload/post", "POST", b"b" * BIG)
    assert (status, headers.get("x-kizuna-flags")) == (503, None)  # the app's own answer, no retry spent
    assert len(app.arrivals) == 1 and sidecar.stats.retries == 0
    assert app.requests[-1].body == b"b" * BIG
    app.script[:] = [503]  # a small body is kept and replayed
    status, _, body = request(addr, "http://upload/post", "POST", b"s" * 1024)
    assert status == 200 and b'"body": "' + b"s" * 1024 in body
    assert len(app.arrivals) == 3 and sidecar.stats.retries == 1


# -- HTTP/2 and gRPC -----------------------------------------------------------------------------------------


def test_refused_stream_is_retried_after_a_backoff(mesh: LocalMesh, h2apps: list[ScriptedH2]) -> None:
    addr, app_addr = loopback_addresses(2, prefix=BLOCK)
    app = h2_app(mesh, h2apps, app_addr, [REFUSE])
    cluster = service_cluster("streams", 80, [(app_addr, app.port)])
    sidecar = mesh.sidecar(addr, snapshot("1", cluster, RetryPolicy()))  # default retryOn has refused-stream
    answer = h2_call(addr, "streams")
    assert (answer.status, answer.body) == (200, b"ok")
    assert len(app.arrivals) == 2 and sidecar.stats.retries == 1
    assert 0.024 <= app.arrivals[1] - app.arrivals[0] < 2.0
    # Without refused-stream (and nothing else covering resets) the refusal shows.
    mesh.apply(sidecar, snapshot("2", cluster, on("retriable-status-codes")))
    app.script[:] = [REFUSE]
    answer = h2_call(addr, "streams")
    assert (answer.status, answer.headers.get("x-kizuna-flags")) == (503, "UC")
    assert len(app.arrivals) == 3


def test_retriable_4xx_and_numeric_codes_over_http2(mesh: LocalMesh, h2apps: list[ScriptedH2]) -> None:
    addr, app_addr = loopback_addresses(2, prefix=BLOCK)
    app = h2_app(mesh, h2apps, app_addr, [409])
    cluster = service_cluster("h2codes", 80, [(app_addr, app.port)])
    sidecar = mesh.sidecar(addr, snapshot("1", cluster, on("retriable-4xx")))
    assert h2_call(addr, "h2codes").status == 200
    assert len(app.arrivals) == 2
    policy = retry_policy(HTTPRetry.model_validate({"attempts": 1, "retryOn": "429"}))
    mesh.apply(sidecar, snapshot("2", cluster, policy))
    app.script[:] = [429, 429]
    answer = h2_call(addr, "h2codes")
    assert (answer.status, answer.headers.get("x-kizuna-flags")) == (429, "URX")
    assert len(app.arrivals) == 4


@pytest.mark.parametrize(("condition", "code"), [("cancelled", 1), ("deadline-exceeded", 4), ("internal", 13),
                                                 ("resource-exhausted", 8)])
def test_grpc_status_named_in_retry_on_is_retried(mesh: LocalMesh, h2apps: list[ScriptedH2], condition: str,
                                                  code: int) -> None:
    addr, app_addr = loopback_addresses(2, prefix=BLOCK)
    app = h2_app(mesh, h2apps, app_addr, [("grpc", code)])
    cluster = service_cluster("echo", 50051, [(app_addr, app.port)])
    sidecar = mesh.sidecar(addr, snapshot("1", cluster, on(condition)))
    answer = h2_call(addr, "echo:50051", "/echo.Echo/Say", GRPC, GRPC_MESSAGE, "POST")
    assert (answer.status, answer.grpc_status(), answer.body) == (200, "0", b"\x00\x00\x00\x00\x02ok")
    assert len(app.arrivals) == 2 and sidecar.stats.retries == 1
    # A route that retries only UNAVAILABLE passes this status on.
    mesh.apply(sidecar, snapshot("2", cluster, on("unavailable")))
    app.script[:] = [("grpc", code)]
    answer = h2_call(addr, "echo:50051", "/echo.Echo/Say", GRPC, GRPC_MESSAGE, "POST")
    assert (answer.status, answer.grpc_status()) == (200, str(code))
    assert len(app.arrivals) == 3 and sidecar.stats.retries == 1


def test_an_http2_body_past_the_replay_bound_is_tried_once(mesh: LocalMesh, h2apps: list[ScriptedH2]) -> None:
    addr, app_addr = loopback_addresses(2, prefix=BLOCK)
    app = h2_app(mesh, h2apps, app_addr, [503])
    cluster = service_cluster("h2upload", 80, [(app_addr, app.port)])
    sidecar = mesh.sidecar(addr, snapshot("1", cluster, RetryPolicy()))
    answer = h2_call(addr, "h2upload", "/upload", body=b"b" * BIG, method="POST")
    assert (answer.status, answer.headers.get("x-kizuna-flags")) == (503, None)
    assert len(app.arrivals) == 1 and sidecar.stats.retries == 0
    app.script[:] = [503]
    answer = h2_call(addr, "h2upload", "/upload", body=b"s" * 1024, method="POST")
    assert answer.status == 200
    assert len(app.arrivals) == 3 and sidecar.stats.retries == 1
