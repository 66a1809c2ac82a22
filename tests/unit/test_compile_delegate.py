"""VirtualService delegation (Istio's ``http[].delegate``): the delegate's routes replace the root route,
matches merged and narrowed as Istio merges them, root settings inherited where the delegate sets none."""

from __future__ import annotations

import textwrap

import pytest

from kizuna.api import ValidationError, parse_all, parse_text
from kizuna.controlplane.compile import compile_snapshot
from kizuna.proxyconfig.bootstrap import Node
from kizuna.proxyconfig.model import Snapshot
from kizuna.testing.simulation import simulate, simulate_route

CLIENT = Node(id="sleep-1.default", workload="sleep", namespace="default", labels=(("app", "sleep"),))

SERVICES = """\
apiVersion: v1
kind: Service
metadata: {name: reviews}
spec: {ports: [{name: http, port: 9080}], selector: {app: reviews}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}},
            {name: v3, labels: {version: v3}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - name: api
    match: [{uri: {prefix: /reviews}}]
    timeout: 2s
    delegate: {name: reviews-team, namespace: team}
  - route: [{destination: {host: reviews, subset: v1}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews-team, namespace: team}
spec:
  http:
  - name: jason
    match: [{uri: {prefix: /reviews/0}, headers: {end-user: {exact: jason}}}]
    route: [{destination: {host: reviews.default.svc.cluster.local, subset: v2}}]
  - name: elsewhere
    match: [{uri: {exact: /ratings}}]
    route: [{destination: {host: reviews.default.svc.cluster.local, subset: v3}}]
  - name: rest
    timeout: 5s
    route: [{destination: {host: reviews.default.svc.cluster.local, subset: v3}}]
"""


def snapshot(text: str = SERVICES) -> Snapshot:
    return compile_snapshot(parse_all(parse_text(textwrap.dedent(text), "inline.yaml")), [], CLIENT, "1")


@pytest.mark.parametrize(("path", "headers", "route", "subset"), [
    ("/reviews/0", {"end-user": "jason"}, "api-jason", "v2"),     # root and delegate matches both hold
    ("/reviews/0", {}, "api-rest", "v3"),                         # delegate's catch-all under the root prefix
    ("/reviews/7", {"end-user": "jason"}, "api-rest", "v3"),
    ("/ratings", {}, "reviews.http[1]", "v1"),                    # conflicting delegate route was dropped
    ("/details", {}, "reviews.http[1]", "v1"),                    # outside the root match: the next root route
])
def test_delegate_routes_take_the_place_of_the_root_route(path: str, headers: dict[str, str], route: str,
                                                          subset: str) -> None:
    sim = simulate(snapshot(), "reviews", 9080, path, headers=headers)
    assert sim is not None
    assert (sim.route, sim.cluster) == (route, f"outbound|9080|{subset}|reviews.default.svc.cluster.local")


def test_delegate_inherits_the_root_settings_it_does_not_set() -> None:
    snap = snapshot()
    jason = simulate_route(snap, "reviews", 9080, "/reviews/0", headers={"end-user": "jason"})
    rest = simulate_route(snap, "reviews", 9080, "/reviews/1")
    assert jason is not None and rest is not None
    assert jason.action.timeout == 2.0 and rest.action.timeout == 5.0


def test_missing_delegate_contributes_no_routes() -> None:
    text = SERVICES.split("---\napiVersion: networking.istio.io/v1\nkind: VirtualService\n"
                          "metadata: {name: reviews-team")[0]
    sim = simulate(snapshot(text), "reviews", 9080, "/reviews/0")
    assert sim is not None and sim.route == "reviews.http[1]"


@pytest.mark.parametrize(("extra", "message"), [
    ("  tcp: [{route: [{destination: {host: x}}]}]\n", "tcp: a delegate VirtualService (no hosts) must not set"),
    ("  gateways: [gw]\n", "gateways: a delegate VirtualService (no hosts) must not set"),
])
def test_delegate_rules_are_validated(extra: str, message: str) -> None:
    text = ("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: d}\nspec:\n"
            "  http: [{route: [{destination: {host: x}}]}]\n" + extra)
    with pytest.raises(ValidationError) as info:
        parse_all(parse_text(text, "d.yaml"))
    assert any(message in e for e in info.value.errors), info.value.errors
