"""The dashboard's view of Istio metrics: Prometheus text from a real sidecar's ``Telemetry`` in, rates per
edge out — request rate, error share (non-2xx/3xx), p50/p99 from the histogram buckets (as PromQL's
``histogram_quantile``), the mTLS flag — and the graph and service views built from them."""

from __future__ import annotations

import time

import pytest

from kizuna.controlplane.dashboard_graph import (
    History,
    Member,
    Point,
    ServiceInfo,
    Topology,
    graph,
    host_matches,
    rules_for,
    service_series,
)
from kizuna.controlplane.dashboard_metrics import (
    DURATION_BOUNDS,
    Workload,
    delta,
    histogram_quantile,
    interval_of,
    parse,
)
from kizuna.proxy.telemetry import DESTINATION, SOURCE, Telemetry, service_labels

SLEEP_T = ("sleep", "default", "spiffe://cluster.local/ns/default/sa/sleep", "sleep", "unknown")
HTTPBIN_T = ("httpbin-v1", "default", "spiffe://cluster.local/ns/default/sa/httpbin", "httpbin", "v1")
FQDN = "httpbin.default.svc.cluster.local"
SERVICE = service_labels(FQDN)
SLEEP = Workload("default", "sleep", "sleep", "unknown")
HTTPBIN = Workload("default", "httpbin-v1", "httpbin", "v1")


def _serve(telemetry: Telemetry, count: int, code: int = 200, duration: float = 3.0,
           security: str = "mutual_tls", reporter: int = DESTINATION, peer: tuple[str, ...] = SLEEP_T) -> None:
    for _ in range(count):
        telemetry.record_http(reporter, peer, SERVICE, code, "-", security, duration, 0, 100)


def _interval(*pairs: tuple[str, str]) -> dict[tuple[Workload, Workload, str], object]:
    return interval_of(delta(parse(before), parse(after)) for before, after in pairs)


def test_rates_errors_latency_and_mtls_from_two_scrapes_of_a_real_sidecar() -> None:
    server = Telemetry(HTTPBIN_T, 15001)
    _serve(server, 10)
    first = server.exposition()
    _serve(server, 90, duration=3.0)
    _serve(server, 10, code=503, duration=40.0)
    _serve(server, 5, code=404, duration=0.3)
    _serve(server, 5, code=302, duration=0.3)
    second = server.exposition()
    edges = _interval((first, second))
    stats = edges[(SLEEP, HTTPBIN, FQDN)]
    assert stats.requests == 110  # the 10 before the first scrape are not in the interval
    assert stats.errors == 15  # 503 and 404 count; 302 does not
    assert stats.mtls == 110
    assert stats.quantile(0.5) == pytest.approx(1 + 4 * (55 - 10) / 90)  # in the (1, 5] bucket
    assert 25 < stats.quantile(0.99) <= 50  # the 503s took 40 ms
    history = History()
    history.add(Point(100.0, 5.0, edges))  # type: ignore[arg-type]
    view = graph(history, Topology(), now=101.0)
    (edge,) = view["edges"]
    assert edge["source"] == "default/sleep" and edge["target"] == "default/httpbin-v1"
    assert edge["rps"] == pytest.approx(22.0)
    assert edge["errorRate"] == pytest.approx(15 / 110, abs=1e-4)
    assert edge["mtls"] is True


def test_failed_grpc_calls_are_errors_though_http_said_200() -> None:
    server = Telemetry(HTTPBIN_T, 15001)
    before = server.exposition()
    for status, count in (("0", 8), ("5", 2)):
        for _ in range(count):
            server.record_http(DESTINATION, SLEEP_T, SERVICE, 200, "-", "mutual_tls", 1.0, 5, 7, status)
    stats = _interval((before, server.exposition()))[(SLEEP, HTTPBIN, FQDN)]
    assert stats.requests == 10 and stats.errors == 2


def test_plaintext_traffic_has_no_lock_and_each_edge_is_counted_once() -> None:
    client, server = Telemetry(SLEEP_T, 15001), Telemetry(HTTPBIN_T, 15001)
    before = (client.exposition(), server.exposition())
    _serve(client, 20, security="unknown", reporter=SOURCE, peer=HTTPBIN_T)
    _serve(server, 20, security="none")
    edges = _interval((before[0], client.exposition()), (before[1], server.exposition()))
    stats = edges[(SLEEP, HTTPBIN, FQDN)]
    assert stats.requests == 20  # the destination's report wins; the source's is not added
    history = History()
    history.add(Point(10.0, 2.0, edges))  # type: ignore[arg-type]
    (edge,) = graph(history, Topology(), now=10.0)["edges"]
    assert edge["mtls"] is False and edge["rps"] == 10.0


def test_source_report_is_used_when_no_destination_reports() -> None:
    client = Telemetry(SLEEP_T, 15001)
    before = client.exposition()
    _serve(client, 4, code=503, reporter=SOURCE, peer=("unknown",) * 5, security="unknown")
    edges = _interval((before, client.exposition()))
    (key,) = edges
    assert key[0] == SLEEP and key[1].name == "unknown" and edges[key].errors == 4
    history = History()
    history.add(Point(10.0, 1.0, edges))  # type: ignore[arg-type]
    view = graph(history, Topology(), now=10.0)
    (edge,) = view["edges"]
    # No workload answered: the edge ends at the service it was meant for.
    assert edge["target"] == "svc:default/httpbin" and edge["errorRate"] == 1.0


def test_counter_reset_counts_the_new_value_and_idle_series_do_not_show() -> None:
    server = Telemetry(HTTPBIN_T, 15001)
    _serve(server, 50)
    old = parse(server.exposition())
    restarted = Telemetry(HTTPBIN_T, 15001)
    _serve(restarted, 7)
    changed = delta(old, parse(restarted.exposition()))
    assert interval_of([changed])[(SLEEP, HTTPBIN, FQDN)].requests == 7
    assert delta(old, old) == {}


def test_histogram_quantile_matches_promql() -> None:
    # Prometheus: buckets le=1:10, le=5:20, +Inf:20 → q=0.5 → rank 10 → upper bound of the first bucket.
    buckets = [0.0, 10.0, 20.0] + [20.0] * (len(DURATION_BOUNDS) - 2)
    assert histogram_quantile(0.5, buckets) == 1.0
    assert histogram_quantile(0.75, buckets) == pytest.approx(3.0)  # halfway through (1, 5]
    assert histogram_quantile(0.5, [0.0] * (len(DURATION_BOUNDS) + 1)) is None
    only_inf = [0.0] * len(DURATION_BOUNDS) + [5.0]
    assert histogram_quantile(0.99, only_inf) == DURATION_BOUNDS[-1]


def test_graph_groups_workloads_by_service_and_marks_the_gateway() -> None:
    gateway = Workload("istio-system", "istio-ingressgateway", "istio-ingressgateway")
    v2 = Workload("default", "httpbin-v2", "httpbin", "v2")
    topology = Topology((ServiceInfo("default", "httpbin", (HTTPBIN, v2)), ServiceInfo("default", "sleep", (SLEEP,))),
                        (Member(HTTPBIN), Member(v2), Member(SLEEP), Member(gateway, True)), frozenset({gateway}))
    view = graph(History(), topology, now=time.time())
    nodes = {n["id"]: n for n in view["nodes"]}
    assert nodes["default/httpbin-v2"]["parent"] == "svc:default/httpbin"
    assert nodes["default/httpbin-v2"]["label"] == "httpbin v2"
    assert nodes["istio-system/istio-ingressgateway"]["kind"] == "gateway"
    assert nodes["istio-system/istio-ingressgateway"]["parent"] is None
    assert nodes["svc:default/sleep"]["kind"] == "service"
    assert view["edges"] == []


def test_service_series_has_one_point_per_interval() -> None:
    server = Telemetry(HTTPBIN_T, 15001)
    history = History(capacity=3)
    previous = server.exposition()
    for i in range(5):
        _serve(server, 10 * (i + 1), code=500 if i == 4 else 200)
        current = server.exposition()
        history.add(Point(float(i + 1), 1.0, _interval((previous, current))))  # type: ignore[arg-type]
        previous = current
    series = service_series(history, FQDN)
    assert series["time"] == [3.0, 4.0, 5.0]  # bounded: the oldest intervals were dropped
    assert series["rps"] == [30.0, 40.0, 50.0]
    assert series["errorRate"] == [0.0, 0.0, 1.0]
    assert all(1 < p <= 5 for p in series["p50"])
    assert service_series(history, "other.default.svc.cluster.local")["rps"] == [0.0, 0.0, 0.0]


def test_rules_that_apply_to_a_service() -> None:
    assert host_matches("httpbin", "default", FQDN)
    assert host_matches("httpbin.default", "other", FQDN)
    assert host_matches("*.default.svc.cluster.local", "x", FQDN)
    assert not host_matches("httpbin", "other", FQDN)
    rules = [
        {"kind": "VirtualService", "metadata": {"name": "mine"}, "spec": {"hosts": ["httpbin"]}},
        {"kind": "VirtualService", "metadata": {"name": "elsewhere", "namespace": "prod"},
         "spec": {"hosts": ["httpbin"]}},
        {"kind": "VirtualService", "metadata": {"name": "ingress"},
         "spec": {"hosts": ["*"], "gateways": ["httpbin-gateway"],
                  "http": [{"route": [{"destination": {"host": "httpbin"}}]}]}},
        {"kind": "VirtualService", "metadata": {"name": "other-ingress"},
         "spec": {"hosts": ["*"], "gateways": ["gw"], "http": [{"route": [{"destination": {"host": "x"}}]}]}},
        {"kind": "DestinationRule", "metadata": {"name": "dr"}, "spec": {"host": FQDN}},
    ]
    assert [r["metadata"]["name"] for r in rules_for(FQDN, rules)] == ["mine", "ingress", "dr"]
