"""The pure parts of HTTP/2 route policy and HTTP/1.1 ↔ HTTP/2 translation: header mapping both ways, the
status outlier detection counts, and the route plan the HTTP/1.1 path shares."""

from __future__ import annotations

from kizuna.protocols.http1 import RequestHead, ResponseHead
from kizuna.proxy.errors import SyntheticResponse
from kizuna.proxy.h2_bridge import request_head, response_headers
from kizuna.proxy.h2_front import stream_headers
from kizuna.proxy.h2_policy import downstream_headers, outlier_status, regular, upstream_headers
from kizuna.proxy.h2_routing import Routed
from kizuna.proxy.pool import PoolRegistry
from kizuna.proxy.route_actions import Plan, plan
from kizuna.proxy.state import ProxyState
from kizuna.proxy.stats import Stats
from kizuna.proxyconfig.actions import Fault, HeaderOps, HeaderRules, Redirect, Rewrite, RoutePolicy
from kizuna.proxyconfig.model import (
    Route,
    RouteAction,
    RouteMatch,
    Snapshot,
    StringMatch,
    VirtualHost,
    WeightedCluster,
)
from kizuna.testing.mesh import service_cluster, service_hosts

CLUSTER = service_cluster("web", 80, [("127.0.0.1", 9)])


def _state_and_route(policy: RoutePolicy) -> tuple[ProxyState, Route]:
    route = Route("r", (RouteMatch(uri=StringMatch("prefix", "/old/")),),
                  RouteAction((WeightedCluster(CLUSTER.name, 100),), policy=policy))
    vh = VirtualHost("web:80", service_hosts("web"), 80, "http", (route,))
    state = ProxyState(Snapshot("t", virtual_hosts=(vh,), clusters=(CLUSTER,)), PoolRegistry(), Stats())
    return state, route


H2_REQUEST = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"web"), (b":path", b"/old/x?q=1"),
              (b"x-drop", b"1"), (b"accept", b"*/*")]


def _plan(policy: RoutePolicy) -> Plan | SyntheticResponse:
    state, route = _state_and_route(policy)
    return plan(state, route, policy, b"GET", regular(H2_REQUEST), b"http", 80, b"/old/x?q=1", b"web", {})


def test_plan_rewrites_path_authority_and_headers_of_an_h2_request() -> None:
    planned = _plan(RoutePolicy(rewrite=Rewrite(uri="/new/", authority="api.example"), headers=HeaderRules(
        request=HeaderOps(set=(("x-set", "v"),), remove=("x-drop",)),
        response=HeaderOps(add=(("x-resp", "r"),)))))
    assert isinstance(planned, Plan)
    sent = upstream_headers(H2_REQUEST, planned)
    assert sent[:3] == [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/new/x?q=1")]
    assert (b":authority", b"api.example") in sent
    assert (b"x-set", b"v") in sent and (b"accept", b"*/*") in sent
    assert all(name != b"x-drop" for name, _ in sent)
    assert [n for n, _ in sent].count(b"x-request-id") == 1
    back = downstream_headers([(b":status", b"200")], planned, [])
    assert list(back) == [(b":status", b"200"), (b"x-resp", b"r")]


def test_plan_answers_redirect_and_abort_itself() -> None:
    redirect = _plan(RoutePolicy(redirect=Redirect(uri="/moved")))
    assert isinstance(redirect, SyntheticResponse)
    assert (redirect.status, dict(redirect.headers)[b"location"]) == (301, b"http://web/moved?q=1")
    abort = _plan(RoutePolicy(fault=Fault(grpc_status=14)))
    assert isinstance(abort, SyntheticResponse) and abort.flag == "FI"
    assert dict(abort.headers)[b"grpc-status"] == b"14"


def test_request_id_is_kept_when_the_client_sent_one() -> None:
    sent = upstream_headers([*H2_REQUEST, (b"x-request-id", b"abc")], None)
    assert [v for n, v in sent if n == b"x-request-id"] == [b"abc"]


def test_outlier_status_follows_envoy_for_grpc() -> None:
    assert outlier_status([(b":status", b"503")], grpc=False) == 503
    # A trailers-only gRPC error counts as the HTTP status its code maps to; a normal gRPC head as 200.
    assert outlier_status([(b":status", b"200"), (b"grpc-status", b"14")], grpc=True) == 503
    assert outlier_status([(b":status", b"200"), (b"grpc-status", b"4")], grpc=True) == 504
    assert outlier_status([(b":status", b"200"), (b"grpc-status", b"3")], grpc=True) == 400
    assert outlier_status([(b":status", b"200")], grpc=True) == 200


def test_h2_request_as_http11_head() -> None:
    state, route = _state_and_route(RoutePolicy())
    dest = state.destination(route)
    assert dest is not None
    headers = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"web:80"), (b":path", b"/p"),
               (b"te", b"trailers"), (b"connection", b"keep-alive"), (b"content-length", b"5"), (b"x-a", b"1")]
    head, target, host = request_head(headers, Routed(dest), end_stream=False)
    assert (head.method, target, host) == (b"POST", b"/p", b"web:80")
    assert head.headers == ((b"x-a", b"1"),)
    assert (head.content_length, head.chunked, head.has_request_id) == (5, False, False)
    unknown, _, _ = request_head(headers[:4], Routed(dest), end_stream=False)
    assert unknown.chunked  # a body of unknown length


def test_http11_response_as_h2_headers() -> None:
    head = ResponseHead(200, b"OK", b"1.1", ((b"Content-Type", b"text/plain"), (b"Keep-Alive", b"timeout=5"),
                                             (b"X-App", b"a")), 12, False, True, None)
    assert response_headers(head) == [(b":status", b"200"), (b"content-type", b"text/plain"), (b"x-app", b"a"),
                                      (b"content-length", b"12")]


def test_http11_request_as_h2_stream_headers() -> None:
    head = RequestHead(b"POST", b"/echo.Echo/Say", b"1.1", ((b"Content-Type", b"application/grpc"),
                                                            (b"Transfer-Encoding", b"chunked")),
                       b"echo:50051", None, True, True, False, None, False)
    assert stream_headers(head, head.target) == [
        (b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"echo:50051"), (b":path", b"/echo.Echo/Say"),
        (b"content-type", b"application/grpc"), (b"te", b"trailers")]
