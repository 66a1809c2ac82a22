"""Istio route actions compiled into the snapshot: Istio's own task files, and each action's fields."""

from __future__ import annotations

import base64
import textwrap

import pytest

from kizuna.api import Resource, load_documents, parse_all, parse_text
from kizuna.controlplane.compile import compile_snapshot
from kizuna.controlplane.instances import Instance
from kizuna.proxyconfig.actions import DirectResponse, Fault, HeaderOps, HeaderRules, Mirror, Redirect, Rewrite
from kizuna.proxyconfig.bootstrap import Node
from kizuna.proxyconfig.model import NO_RETRY, Route, Snapshot
from kizuna.testing.samples import ISTIO_SAMPLES
from kizuna.testing.simulation import simulate, simulate_route

BOOKINFO = ISTIO_SAMPLES / "samples/bookinfo"
TIMEOUTS = ISTIO_SAMPLES / "tasks/request-timeouts"
MIRRORING = ISTIO_SAMPLES / "tasks/mirroring"
corpus = pytest.mark.skipif(not ISTIO_SAMPLES.is_dir(), reason="Istio sample corpus not present")


def node(workload: str, n: int, **labels: str) -> Node:
    return Node(id=f"{workload}-0.default", workload=workload, labels=tuple(sorted(labels.items())),
                pod_address=f"127.60.250.{n}", mesh_address=f"127.60.251.{n}", ports=(9080, 80))


def compiled(paths: list[str], extra: str = "", source: str = "client") -> Snapshot:
    resources: list[Resource] = parse_all(load_documents(paths)) if paths else []
    if extra:
        resources += parse_all(parse_text(textwrap.dedent(extra), "extra.yaml"))
    nodes = [node("client", 1, app="client"), node("httpbin-v1", 2, app="httpbin", version="v1"),
             node("httpbin-v2", 3, app="httpbin", version="v2")]
    nodes += [node(f"{a}-{v}", 4 + i, app=a, version=v) for i, (a, v) in enumerate(
        [("productpage", "v1"), ("reviews", "v2"), ("ratings", "v1")])]
    me = next(n for n in nodes if n.workload.startswith(source))
    return compile_snapshot(resources, [Instance(n, True) for n in nodes], me, "1")


def route(snap: Snapshot, host: str, port: int, path: str = "/", **headers: str) -> Route:
    found = simulate_route(snap, host, port, path, headers=headers)
    assert found is not None
    return found


@corpus
def test_request_timeouts_task_files() -> None:
    snap = compiled([str(BOOKINFO / "platform/kube/bookinfo.yaml"),
                     str(BOOKINFO / "networking/destination-rule-all.yaml"),
                     *(str(p) for p in sorted(TIMEOUTS.glob("0[23]*.yaml")))], source="reviews")
    ratings = route(snap, "ratings", 9080).action
    # The legacy integer `percent: 100` reads as 100 %; a route with a fault gets no timeout and no retries.
    assert ratings.policy is not None and ratings.policy.fault == Fault(delay=2.0, delay_percent=100.0,
                                                                        abort_percent=0.0)
    assert ratings.timeout is None and ratings.retry == NO_RETRY
    reviews = route(snap, "reviews", 9080).action
    assert reviews.timeout == 0.5 and reviews.policy is None
    assert [c.cluster for c in reviews.clusters] == ["outbound|9080|v2|reviews.default.svc.cluster.local"]


@corpus
def test_mirroring_task_files() -> None:
    files = [str(MIRRORING / f) for f in ("03-service-httpbin.yaml",
                                           "05-virtualservice-destinationrule-httpbin-all-v1.yaml")]
    snap = compiled(files)
    assert route(snap, "httpbin", 8000).action.policy is None
    # Step 07 replaces step 05's VirtualService; step 05's DestinationRule stays (given here alone).
    snap = compiled([files[0], str(MIRRORING / "07-virtualservice-httpbin-mirror-v2.yaml")], extra=DR_HTTPBIN)
    action = route(snap, "httpbin", 8000).action
    v2 = "outbound|8000|v2|httpbin.default.svc.cluster.local"
    assert action.policy is not None and action.policy.mirrors == (Mirror(v2, 100.0),)
    assert [c.cluster for c in action.clusters] == ["outbound|8000|v1|httpbin.default.svc.cluster.local"]
    # The mirror's cluster is in the snapshot, with the v2 endpoint.
    (mirror_cluster,) = [c for c in snap.clusters if c.name == v2]
    assert [e.workload for e in mirror_cluster.endpoints] == ["httpbin-v2"]


DR_HTTPBIN = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: httpbin}
spec:
  host: httpbin
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
"""


@corpus
def test_ratings_test_abort_sample() -> None:
    snap = compiled([str(BOOKINFO / "platform/kube/bookinfo.yaml"),
                     str(BOOKINFO / "networking/destination-rule-all.yaml"),
                     str(BOOKINFO / "networking/virtual-service-ratings-test-abort.yaml")], source="reviews")
    jason = route(snap, "ratings", 9080, **{"end-user": "jason"}).action
    assert jason.policy is not None and jason.policy.fault == Fault(abort_status=500, abort_percent=100.0,
                                                                    delay_percent=0.0)
    assert route(snap, "ratings", 9080, **{"end-user": "bob"}).action.policy is None


SERVICE = """\
apiVersion: v1
kind: Service
metadata: {name: httpbin}
spec:
  selector: {app: httpbin}
  ports: [{name: http, port: 8000, targetPort: 80}]
---
"""


def actions_snapshot(http: str) -> Snapshot:
    vs = SERVICE + DR_HTTPBIN + textwrap.dedent("""\
    ---
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {name: httpbin}
    spec:
      hosts: [httpbin]
      http:
    """) + textwrap.indent(textwrap.dedent(http), "  ")
    return compiled([], extra=vs)


def test_redirect_direct_response_and_rewrite() -> None:
    snap = actions_snapshot("""\
    - match: [{uri: {prefix: /old}}]
      redirect: {uri: /new, authority: example.org, redirectCode: 308}
    - match: [{uri: {prefix: /moved}}]
      redirect: {scheme: https, derivePort: FROM_REQUEST_PORT}
    - match: [{uri: {exact: /teapot}}]
      directResponse: {status: 418, body: {string: "short and stout"}}
    - match: [{uri: {exact: /bin}}]
      directResponse: {status: 200, body: {bytes: "AAEC"}}
    - match: [{uri: {prefix: /api/}}]
      rewrite: {uri: /anything/, authority: backend.local}
      route: [{destination: {host: httpbin, subset: v1}}]
    - match: [{uri: {regex: "/r/.*"}}]
      rewrite: {uriRegexRewrite: {match: "^/r/([^/]+)/(.*)$", rewrite: "/anything/\\\\2/\\\\1"}}
      route: [{destination: {host: httpbin}}]
    """)
    old = route(snap, "httpbin", 8000, "/old/x").action
    assert simulate(snap, "httpbin", 8000, "/old/x") == ("httpbin.http[0]", "")  # answered by the sidecar
    assert old.clusters == () and old.policy is not None
    assert old.policy.redirect == Redirect(uri="/new", authority="example.org", code=308)
    moved = route(snap, "httpbin", 8000, "/moved").action.policy
    assert moved is not None and moved.redirect == Redirect(scheme="https", derive_port="FROM_REQUEST_PORT")
    teapot = route(snap, "httpbin", 8000, "/teapot").action.policy
    assert teapot is not None and teapot.direct_response == DirectResponse(418, b"short and stout")
    binary = route(snap, "httpbin", 8000, "/bin").action.policy
    assert binary is not None and binary.direct_response == DirectResponse(200, base64.b64decode("AAEC"))
    api = route(snap, "httpbin", 8000, "/api/x").action.policy
    assert api is not None and api.rewrite == Rewrite(uri="/anything/", authority="backend.local")
    regex = route(snap, "httpbin", 8000, "/r/a/b").action.policy
    assert regex is not None and regex.rewrite == Rewrite(regex="^/r/([^/]+)/(.*)$",
                                                          substitution="/anything/\\2/\\1")
    # The snapshot survives its JSON form unchanged (what the discovery stream carries).
    assert Snapshot.from_json(snap.to_json()) == snap


def test_headers_fault_and_mirrors() -> None:
    snap = actions_snapshot("""\
    - headers:
        request: {set: {X-Set: one}, add: {X-Add: two}, remove: [X-Drop]}
        response: {set: {X-Resp: three}, remove: [Server]}
      fault:
        delay: {fixedDelay: 0.2s, percentage: {value: 25}}
        abort: {grpcStatus: UNAVAILABLE, percentage: {value: 50}}
      mirrors:
      - {destination: {host: httpbin, subset: v2}, percentage: {value: 10}}
      - {destination: {host: httpbin, subset: v1}}
      retries: {attempts: 3}
      timeout: 3s
      route:
      - destination: {host: httpbin, subset: v1}
        weight: 80
        headers: {request: {set: {x-version: v1}}}
      - destination: {host: httpbin, subset: v2}
        weight: 20
    """)
    action = route(snap, "httpbin", 8000).action
    policy = action.policy
    assert policy is not None
    assert policy.headers == HeaderRules(HeaderOps((("x-set", "one"),), (("x-add", "two"),), ("x-drop",)),
                                         HeaderOps((("x-resp", "three"),), (), ("server",)))
    assert policy.fault == Fault(0.2, 25.0, None, 14, 50.0)
    assert policy.mirrors == (Mirror("outbound|8000|v2|httpbin.default.svc.cluster.local", 10.0),
                              Mirror("outbound|8000|v1|httpbin.default.svc.cluster.local", 100.0))
    assert action.timeout is None and action.retry == NO_RETRY  # Istio: no timeout or retries with a fault
    v1, v2 = action.clusters
    assert v1.headers == HeaderRules(HeaderOps((("x-version", "v1"),)), HeaderOps()) and v2.headers is None
    assert policy.destination_headers
    assert Snapshot.from_json(snap.to_json()) == snap


def test_routes_without_actions_keep_their_json() -> None:
    snap = actions_snapshot("""\
    - route: [{destination: {host: httpbin, subset: v1}}]
    """)
    action = route(snap, "httpbin", 8000).action
    assert action.policy is None
    # No new keys for routes that use none of the actions: snapshot digests of existing configs are stable.
    assert set(action.to_json()) == {"clusters", "timeout", "retry"}
    assert set(action.clusters[0].to_json()) == {"cluster", "weight"}
