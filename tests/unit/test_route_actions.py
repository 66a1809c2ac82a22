"""The pure parts of route actions: rewrite, redirect Location, header operations, synthetic responses."""

from __future__ import annotations

import pytest

from kizuna.proxy.errors import NO_ROUTE, UPSTREAM_CONNECT_ERROR, direct, fault_abort, redirect
from kizuna.proxy.headers import apply_ops, shadow_host
from kizuna.proxy.route_actions import location, rewritten_path
from kizuna.proxyconfig.actions import HeaderOps, Redirect, Rewrite
from kizuna.proxyconfig.model import RouteMatch, StringMatch


def uri(kind: str, value: str) -> RouteMatch:
    return RouteMatch(uri=StringMatch(kind, value))  # type: ignore[arg-type]


@pytest.mark.parametrize(("rewrite", "match", "path", "expected"), [
    (Rewrite(uri="/v1/"), uri("prefix", "/api/"), b"/api/users?id=3", b"/v1/users?id=3"),
    (Rewrite(uri="/"), uri("prefix", "/api"), b"/api/users", b"//users"),  # Envoy: a plain prefix swap
    (Rewrite(uri="/new"), uri("exact", "/old"), b"/old?q=1", b"/new?q=1"),
    (Rewrite(uri="/all"), uri("regex", "/r/.*"), b"/r/x/y", b"/all"),
    (Rewrite(uri="/v1"), None, b"/foo", b"/v1foo"),  # no uri condition: prefix "/"
    (Rewrite(regex="^/r/([^/]+)/(.*)$", substitution="/anything/\\2/\\1"), None, b"/r/a/b/c?z",
     b"/anything/b/c/a?z"),
    (Rewrite(regex="o", substitution="0"), None, b"/foo/boo", b"/f00/b00"),  # every match replaced
    (Rewrite(authority="other"), None, b"/same", b"/same"),
])
def test_rewritten_path(rewrite: Rewrite, match: RouteMatch | None, path: bytes, expected: bytes) -> None:
    assert rewritten_path(rewrite, match, path) == expected


@pytest.mark.parametrize(("r", "authority", "path", "expected"), [
    (Redirect(uri="/new"), b"httpbin:8000", b"/old?x=1", b"http://httpbin:8000/new?x=1"),
    (Redirect(uri="/new?y=2"), b"httpbin:8000", b"/old?x=1", b"http://httpbin:8000/new?y=2"),
    (Redirect(authority="example.org"), b"httpbin:8000", b"/p", b"http://example.org/p"),
    (Redirect(authority="example.org", port=8443, scheme="https"), b"httpbin", b"/p",
     b"https://example.org:8443/p"),
    (Redirect(scheme="https"), b"httpbin:8000", b"/p", b"https://httpbin/p"),
    (Redirect(scheme="https", derive_port="FROM_REQUEST_PORT"), b"httpbin:8000", b"/p",
     b"https://httpbin:8000/p"),
    (Redirect(uri="/x", derive_port="FROM_PROTOCOL_DEFAULT"), b"httpbin:8000", b"/p", b"http://httpbin/x"),
    (Redirect(port=80), b"httpbin:8000", b"/p", b"http://httpbin/p"),  # the scheme's default port is implied
])
def test_redirect_location(r: Redirect, authority: bytes, path: bytes, expected: bytes) -> None:
    assert location(r, None, b"http", authority, path) == expected


def test_redirect_prefix_rewrite_replaces_the_matched_prefix() -> None:
    r = Redirect(prefix_rewrite="/v2/")
    assert location(r, uri("prefix", "/v1/"), b"http", b"web", b"/v1/a?b") == b"http://web/v2/a?b"


def test_header_operations() -> None:
    headers = ((b"X-Keep", b"1"), (b"X-Drop", b"2"), (b"x-set", b"old"), (b"X-Add", b"a"))
    ops = HeaderOps(set=(("x-set", "new"),), add=(("x-add", "b"),), remove=("x-drop",))
    assert apply_ops(ops, headers) == ((b"X-Keep", b"1"), (b"X-Add", b"a"), (b"x-set", b"new"),
                                       (b"x-add", b"b"))
    assert apply_ops(HeaderOps(), headers) == headers


@pytest.mark.parametrize(("authority", "shadow"), [
    (b"httpbin:8000", b"httpbin-shadow:8000"), (b"httpbin", b"httpbin-shadow"),
    (b"httpbin.default.svc.cluster.local:80", b"httpbin.default.svc.cluster.local-shadow:80"),
    (b"[::1]:80", b"[::1]-shadow:80"),
])
def test_shadow_host(authority: bytes, shadow: bytes) -> None:
    assert shadow_host(authority) == shadow


def test_synthetic_responses_carry_reason_and_flags() -> None:
    wire = NO_ROUTE.encode()
    assert wire.startswith(b"HTTP/1.1 404 Not Found\r\n")
    assert b"x-kizuna-error: no route\r\n" in wire and b"x-kizuna-flags: NR\r\n" in wire
    retried = UPSTREAM_CONNECT_ERROR.with_flag("URX")
    assert b"x-kizuna-flags: UF,URX\r\n" in retried.encode(close=True)
    abort = fault_abort(418, None).encode()
    assert abort.startswith(b"HTTP/1.1 418 ")
    assert b"x-kizuna-flags: FI\r\n" in abort and abort.endswith(b"\r\n\r\nfault filter abort\n")
    grpc = fault_abort(None, 14).encode()
    assert grpc.startswith(b"HTTP/1.1 200 OK\r\n") and b"grpc-status: 14\r\n" in grpc
    assert b"content-type: application/grpc\r\n" in grpc and grpc.endswith(b"content-length: 0\r\n\r\n")
    moved = redirect(b"http://web/new", 301).encode()
    assert moved.startswith(b"HTTP/1.1 301 Moved Permanently\r\n") and b"location: http://web/new\r\n" in moved
    assert b"x-kizuna-error" not in moved and b"x-kizuna-flags" not in moved
    teapot = direct(200, b"hello", ((b"x-a", b"1"),)).encode()
    assert b"x-a: 1\r\n" in teapot and teapot.endswith(b"content-length: 5\r\n\r\nhello")


def test_forwarded_proto_says_the_scheme_the_client_used() -> None:
    from kizuna.proxy.headers import forwarded_proto

    class Plain:
        def get_extra_info(self, name: str, default: object = None) -> object:
            return default

    class Tls(Plain):
        def get_extra_info(self, name: str, default: object = None) -> object:
            return object() if name == "ssl_object" else default

    claimed = ((b"host", b"a"), (b"X-Forwarded-Proto", b"https"))
    assert forwarded_proto(claimed, Plain()) == ((b"host", b"a"), (b"x-forwarded-proto", b"http"))
    assert forwarded_proto(((b"host", b"a"),), Tls()) == ((b"host", b"a"), (b"x-forwarded-proto", b"https"))
