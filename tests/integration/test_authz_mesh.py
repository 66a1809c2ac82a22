"""AuthorizationPolicy enforced by a real inbound sidecar, with Istio's task files unchanged: authz-deny on an
httpbin-like app, allow-nothing, path rules, and authz-tcp on TCP echo apps at ports 9000-9002. Snapshots are
compiled from the YAML exactly as the control plane compiles them; clients dial the sidecar's inbound port as
another sidecar would (plaintext, so no peer identity yet)."""

from __future__ import annotations

import http.client
import socket
import textwrap
from dataclasses import replace

import pytest

from kizuna.api import Resource, load_documents, parse_all, parse_text
from kizuna.controlplane.compile import compile_snapshot
from kizuna.proxy.sidecar import Sidecar
from kizuna.proxyconfig.bootstrap import Node
from kizuna.proxyconfig.model import Snapshot
from kizuna.testing.mesh import LocalMesh, loopback_addresses
from kizuna.testing.samples import ISTIO_SAMPLES
from kizuna.testing.upstream import UpstreamServer

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not (ISTIO_SAMPLES / "tasks").is_dir(), reason="Istio sample corpus not present")]

TASKS = ISTIO_SAMPLES / "tasks"


def task(*names: str, namespace: str = "foo") -> list[Resource]:
    return parse_all(load_documents([TASKS / n for n in names]), default_namespace=namespace)


class Httpbin:
    """An httpbin-like app in namespace foo behind its sidecar; ``apply`` compiles policies for it."""

    def __init__(self, mesh: LocalMesh) -> None:
        self.mesh = mesh
        pod, self.side = loopback_addresses(2, prefix="127.84")
        self.app: UpstreamServer = mesh.upstream(pod, 0, name="httpbin")
        self.node = Node("httpbin-0.foo", "httpbin", "foo", "httpbin", (("app", "httpbin"),), pod_address=pod,
                         mesh_address=self.side, ports=(self.app.port,))
        self.sidecar: Sidecar = mesh.sidecar(self.side, self.snapshot([]), pod_address=pod)

    def snapshot(self, items: list[Resource]) -> Snapshot:
        return compile_snapshot(items, [], self.node, "1")

    def apply(self, items: list[Resource]) -> None:
        self.mesh.apply(self.sidecar, self.snapshot(items))

    def call(self, method: str, path: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection(self.side, self.app.port, timeout=10)
        try:
            conn.request(method, path, headers=headers)
            response = conn.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            conn.close()


def denied(reply: tuple[int, dict[str, str], bytes]) -> bool:
    status, headers, body = reply
    return status == 403 and body == b"RBAC: access denied" and headers["x-kizuna-error"] == "rbac access denied"


def test_authz_deny_task_as_documented(mesh: LocalMesh) -> None:
    httpbin = Httpbin(mesh)
    assert httpbin.call("GET", "/get")[0] == 200
    httpbin.apply(task("authz-deny/01-authorizationpolicy-deny-method-get.yaml"))
    assert denied(httpbin.call("GET", "/get"))
    assert httpbin.call("POST", "/post")[0] == 200
    httpbin.apply(task("authz-deny/02-authorizationpolicy-deny-method-get-unless-admin.yaml"))
    assert httpbin.call("GET", "/get", **{"x-token": "admin"})[0] == 200
    assert denied(httpbin.call("GET", "/get", **{"x-token": "guest"}))
    httpbin.apply(task("authz-deny/02-authorizationpolicy-deny-method-get-unless-admin.yaml",
                       "authz-deny/03-authorizationpolicy-allow-path-ip.yaml"))
    assert denied(httpbin.call("GET", "/ip", **{"x-token": "guest"}))
    assert httpbin.call("GET", "/ip", **{"x-token": "admin"})[0] == 200
    assert denied(httpbin.call("GET", "/get", **{"x-token": "admin"}))
    # Denied requests never reached the app.
    seen = [(r.method, r.target, r.header("x-token")) for r in httpbin.app.requests]
    assert seen == [("GET", "/get", None), ("POST", "/post", None), ("GET", "/get", "admin"),
                    ("GET", "/ip", "admin")]
    security = httpbin.sidecar.stats_json()["security"]
    assert (security["rq_denied"], security["rq_allowed"]) == (4, 3)
    assert httpbin.sidecar.stats_json()["errors"]["rbac access denied"] == 4


def test_allow_nothing_then_allow_get_and_path_rules(mesh: LocalMesh) -> None:
    httpbin = Httpbin(mesh)
    nothing = parse_all(load_documents([TASKS / "authz-http/01-authorizationpolicy-allow-nothing.yaml"]))
    moved = parse_all(parse_text(textwrap.dedent("""\
        apiVersion: security.istio.io/v1beta1
        kind: AuthorizationPolicy
        metadata: {name: allow-nothing, namespace: foo}
        spec: {}
        """), "n.yaml"))
    assert nothing[0].namespace == "default"
    httpbin.apply(nothing)  # the task's file is for namespace default: no effect on foo
    assert httpbin.call("GET", "/get")[0] == 200
    httpbin.apply(moved)
    assert denied(httpbin.call("GET", "/get"))
    assert denied(httpbin.call("POST", "/post"))
    allow_get = parse_all(parse_text(textwrap.dedent("""\
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: viewer, namespace: foo}
        spec:
          selector: {matchLabels: {app: httpbin}}
          rules:
          - to: [{operation: {methods: [GET, HEAD], paths: ["/status/*", "/headers"]}}]
          - to: [{operation: {methods: [POST], notPaths: ["/admin*"]}}]
        """), "v.yaml"))
    httpbin.apply(moved + allow_get)
    assert httpbin.call("GET", "/status/201")[0] == 201
    assert httpbin.call("GET", "/headers")[0] == 200
    assert denied(httpbin.call("GET", "/get"))
    assert denied(httpbin.call("GET", "/status/../admin"))  # normalized before matching
    assert httpbin.call("POST", "/post")[0] == 200
    assert denied(httpbin.call("POST", "/admin/users"))
    # A request with a body that is refused closes the connection after the 403 (the body is not read).
    conn = http.client.HTTPConnection(httpbin.side, httpbin.app.port, timeout=10)
    try:
        conn.request("PUT", "/put", body=b"x" * 1000)
        response = conn.getresponse()
        assert (response.status, response.read()) == (403, b"RBAC: access denied")
    finally:
        conn.close()


def test_policies_follow_snapshots_on_a_kept_alive_connection(mesh: LocalMesh) -> None:
    httpbin = Httpbin(mesh)
    conn = http.client.HTTPConnection(httpbin.side, httpbin.app.port, timeout=10)
    try:
        conn.request("GET", "/get")
        first = conn.getresponse()
        assert first.status == 200
        first.read()
        httpbin.apply(task("authz-deny/01-authorizationpolicy-deny-method-get.yaml"))
        conn.request("GET", "/get")
        response = conn.getresponse()
        assert (response.status, response.read()) == (403, b"RBAC: access denied")
        httpbin.apply([])
        conn.request("GET", "/get")
        response = conn.getresponse()
        assert response.status == 200
        response.read()
    finally:
        conn.close()


def tcp_exchange(address: str, port: int) -> bytes:
    """Send a line and read what comes back: the echo, or b"" when the sidecar closed the connection."""
    with socket.create_connection((address, port), timeout=5) as sock:
        sock.sendall(b"hello\n")
        data = b""
        try:
            while not data.endswith(b"\n"):
                chunk = sock.recv(1024)
                if not chunk:
                    break
                data += chunk
        except ConnectionResetError:
            return b""
        return data


@pytest.mark.parametrize(("policy", "open_ports"), [
    ("authz-tcp/01-authorizationpolicy-tcp-policy-allow-9000-9001.yaml", {9000, 9001}),
    ("authz-tcp/02-authorizationpolicy-tcp-policy-allow-http-only-field.yaml", set()),
    ("authz-tcp/03-authorizationpolicy-tcp-policy-deny-http-only-field.yaml", set()),
    ("authz-tcp/04-authorizationpolicy-tcp-policy-deny-http-and-tcp-fields.yaml", {9001, 9002}),
])
def test_authz_tcp_task_on_tcp_echo(mesh: LocalMesh, policy: str, open_ports: set[int]) -> None:
    pod, side = loopback_addresses(2, prefix="127.84")
    echoes = {port: mesh.echo(pod, port) for port in (9000, 9001, 9002)}
    node = Node("tcp-echo-0.foo", "tcp-echo", "foo", "tcp-echo", (("app", "tcp-echo"),), pod_address=pod,
                mesh_address=side, ports=(9000, 9001, 9002))
    sidecar = mesh.sidecar(side, compile_snapshot([], [], node, "1"), pod_address=pod)
    assert all(tcp_exchange(side, port) == b"hello\n" for port in (9000, 9001, 9002))
    mesh.apply(sidecar, compile_snapshot(task(policy), [], node, "2"))
    reached = {port for port in (9000, 9001, 9002) if tcp_exchange(side, port) == b"hello\n"}
    assert reached == open_ports
    # A refused connection never reaches the app: only the first (pre-policy) exchange did.
    assert {port: echo.connections for port, echo in echoes.items()} == {
        port: 2 if port in open_ports else 1 for port in echoes}
    security = sidecar.stats_json()["security"]
    assert security.get("cx_denied", 0) == 3 - len(open_ports)


def test_http2_streams_are_checked_too(mesh: LocalMesh) -> None:
    from tests.integration.test_h2_policy import h2_requests

    httpbin = Httpbin(mesh)
    jwks = (ISTIO_SAMPLES / "security/tools/jwt/samples/jwks.json").read_text()
    demo = (ISTIO_SAMPLES / "security/tools/jwt/samples/demo.jwt").read_text().strip()
    ra = parse_all(parse_text(textwrap.dedent(f"""\
        apiVersion: security.istio.io/v1
        kind: RequestAuthentication
        metadata: {{name: jwt, namespace: foo}}
        spec:
          jwtRules: [{{issuer: testing@secure.istio.io, jwks: '{jwks.strip()}'}}]
        """), "ra.yaml"))
    compiled = httpbin.snapshot(task("authz-deny/01-authorizationpolicy-deny-method-get.yaml") + ra)
    # The app speaks HTTP/1.1 only: h2c streams are bridged to it.
    inbound = tuple(replace(p, http_version="1.1") for p in compiled.inbound)
    mesh.apply(httpbin.sidecar, replace(compiled, inbound=inbound))

    def stream(method: str, token: str | None = None) -> list[tuple[str, str]]:
        headers = [(":method", method), (":scheme", "http"), (":authority", "httpbin.foo"), (":path", "/anything")]
        return headers + ([("authorization", f"Bearer {token}")] if token else [])

    get, post, bad, good = h2_requests(httpbin.side, httpbin.app.port, [
        (stream("GET"), b""), (stream("POST"), b"x"), (stream("POST", "invalidToken"), b"x"),
        (stream("POST", demo), b"x")])
    assert (get.status, get.body) == (403, b"RBAC: access denied")
    assert post.status == 200 and good.status == 200
    assert bad.status == 401
    assert [(r.method, r.header("authorization")) for r in httpbin.app.requests] == [("POST", None), ("POST", None)]
