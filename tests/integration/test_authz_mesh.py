"""AuthorizationPolicy enforced by a real inbound sidecar, with Istio's task files unchanged: authz-deny on an
httpbin-like app, allow-nothing, path rules, and authz-tcp on TCP echo apps at ports 9000-9002. Snapshots are
compiled from the YAML exactly as the control plane compiles them; clients dial the sidecar's inbound port as
another sidecar would (plaintext, so no peer identity yet)."""

from __future__ import annotations

import http.client
import ipaddress
import socket
import textwrap
from dataclasses import replace
from pathlib import Path
from typing import Any

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
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "httpbin"
BLOCK = ipaddress.IPv4Network("127.106.192.0/18")


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


def test_authz_deny_task_on_kizuna_up(mesh_factory: Any, kit: Any, tmp_path: Path) -> None:
    """The same task on ``kizuna up``: the examples' httpbin and sleep moved to namespace foo (as the task
    deploys them), Istio's files applied unchanged with ``kizuna apply``, sleep calling through its sidecar."""
    import yaml

    from kizuna.runtime.addresses import choose_pod_range

    manifests = []
    for name in ("httpbin.yaml", "sleep.yaml"):
        documents = [d for d in yaml.safe_load_all((EXAMPLE / name).read_text()) if d]
        for document in documents:
            document["metadata"]["namespace"] = "foo"
        manifests.append(tmp_path / name)
        manifests[-1].write_text(yaml.safe_dump_all(documents))
    pods = choose_pod_range(str(tmp_path), block=BLOCK).network
    up = mesh_factory(*manifests, extra=["--pod-cidr", str(pods)])

    def via_sleep(method: str, path: str, **headers: str) -> int:
        conn = http.client.HTTPConnection(up.instance("sleep")["meshAddress"], 15001, timeout=15)
        try:
            conn.request(method, f"http://httpbin.foo:8000{path}", headers=headers)
            response = conn.getresponse()
            body = response.read()
            assert response.status != 403 or body == b"RBAC: access denied"
            return response.status
        finally:
            conn.close()

    def step(name: str, expected: list[tuple[str, str, dict[str, str], int]]) -> None:
        assert up.kizuna("apply", "-f", TASKS / "authz-deny" / name).returncode == 0
        # Each expectation holds on both httpbin instances once the push has reached them.
        kit.wait_until(lambda: all(via_sleep(m, p, **h) == s for m, p, h, s in expected for _ in range(2)), 30,
                       f"{name} to be enforced")

    assert via_sleep("GET", "/get") == 200
    step("01-authorizationpolicy-deny-method-get.yaml", [("GET", "/get", {}, 403), ("POST", "/post", {}, 200)])
    step("02-authorizationpolicy-deny-method-get-unless-admin.yaml",
         [("GET", "/get", {"x-token": "admin"}, 200), ("GET", "/get", {"x-token": "guest"}, 403)])
    step("03-authorizationpolicy-allow-path-ip.yaml",
         [("GET", "/ip", {"x-token": "admin"}, 200), ("GET", "/ip", {"x-token": "guest"}, 403),
          ("GET", "/get", {"x-token": "admin"}, 403)])
