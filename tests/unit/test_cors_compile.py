"""corsPolicy compiled into the route's RoutePolicy (the contract the sidecar's CORS filter runs on)."""

from __future__ import annotations

import textwrap

from kizuna.api import parse_all, parse_text
from kizuna.controlplane.compile import compile_snapshot
from kizuna.proxyconfig.actions import Cors, RoutePolicy
from kizuna.proxyconfig.bootstrap import Node
from kizuna.proxyconfig.model import Snapshot, StringMatch
from kizuna.testing.simulation import simulate_route

NODE = Node(id="sleep-1.default", workload="sleep", namespace="default", pod_address="127.90.0.2",
            mesh_address="127.90.0.3")


def policy_of(cors: str) -> tuple[Snapshot, RoutePolicy | None]:
    text = textwrap.dedent("""\
    apiVersion: v1
    kind: Service
    metadata: {name: web}
    spec: {selector: {app: web}, ports: [{name: http, port: 80}]}
    ---
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {name: web}
    spec:
      hosts: [web]
      http:
      - route: [{destination: {host: web}}]
    """) + textwrap.indent(textwrap.dedent(cors), "    ")
    snap = compile_snapshot(parse_all(parse_text(text, "vs.yaml")), [], NODE, "1")
    route = simulate_route(snap, "web", 80, "/")
    assert route is not None
    return snap, route.action.policy


def test_every_cors_field_reaches_the_route() -> None:
    snap, policy = policy_of("""\
    corsPolicy:
      allowOrigins: [{exact: "https://a.example"}, {prefix: "https://dev."}, {regex: ".*[.]b[.]example"}]
      allowMethods: [GET, POST]
      allowHeaders: [x-custom]
      exposeHeaders: [x-exposed]
      maxAge: 1m30s
      allowCredentials: true
      unmatchedPreflights: IGNORE
    """)
    assert policy is not None and policy.cors == Cors(
        (StringMatch("exact", "https://a.example"), StringMatch("prefix", "https://dev."),
         StringMatch("regex", ".*[.]b[.]example")),
        ("GET", "POST"), ("x-custom",), ("x-exposed",), 90, True, False)
    assert Snapshot.from_json(snap.to_json()) == snap
    cors = policy.cors
    assert cors.allows("https://a.example") and cors.allows("https://dev.shop") and cors.allows("http://x.b.example")
    assert not cors.allows("https://a.example.evil") and not cors.allows("https://c.example")


def test_deprecated_allow_origin_and_the_any_origin() -> None:
    _, policy = policy_of("corsPolicy: {allowOrigin: ['*']}\n")
    assert policy is not None and policy.cors is not None
    assert policy.cors.allows("https://anything.example") and policy.cors.forward_unmatched


def test_cors_without_origins_does_nothing() -> None:
    # Envoy's filter without allowed origins never adds headers nor answers preflights: nothing to carry.
    _, policy = policy_of("corsPolicy: {allowMethods: [GET]}\n")
    assert policy is None
