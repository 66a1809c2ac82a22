"""Istio metrics recording and their Prometheus exposition: labels, histogram buckets, the text format as the
official parser (prometheus_client) reads it, and the peer header's trust rules."""

from __future__ import annotations

import math

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kizuna.proxy.stats import Stats
from kizuna.proxy.telemetry import (
    DESTINATION,
    DURATION_BUCKETS,
    SOURCE,
    UNKNOWN_WORKLOAD,
    Telemetry,
    app_version,
    decode_peer,
    encode_peer,
    service_labels,
    stats_exposition,
)
from kizuna.proxyconfig.bootstrap import Bootstrap, Node

SLEEP = ("sleep", "default", "cluster.local/ns/default/sa/sleep", "sleep", "v1")
HTTPBIN = ("httpbin-v1", "default", "cluster.local/ns/default/sa/httpbin", "httpbin", "v1")
SERVICE = service_labels("httpbin.default.svc.cluster.local")


def parse_exposition(text: str) -> list[tuple[str, dict[str, str], float]]:
    """(sample name, labels, value) of every sample, read by Prometheus' own Python parser (strict: a malformed
    line raises)."""
    return [(s.name, dict(s.labels), s.value) for family in text_string_to_metric_families(text)
            for s in family.samples]


def test_service_and_canonical_labels() -> None:
    assert SERVICE == ("httpbin.default.svc.cluster.local", "httpbin", "default")
    assert service_labels("api.example.com") == ("api.example.com", "api.example.com", "unknown")
    assert app_version((("app", "reviews"), ("version", "v2"))) == ("reviews", "v2")
    assert app_version((("app", "a"), ("app.kubernetes.io/name", "b"))) == ("b", "unknown")


def test_local_workload_from_bootstrap() -> None:
    node = Node("httpbin-v1-0.default", "httpbin-v1", labels=(("app", "httpbin"), ("version", "v1")))
    plain = Telemetry.from_bootstrap(Bootstrap(node))
    assert plain.local == ("httpbin-v1", "default", "unknown", "httpbin", "v1")
    mtls = Telemetry.from_bootstrap(Bootstrap(node, credential="secret"))
    assert mtls.local[2] == "cluster.local/ns/default/sa/default"


def test_requests_by_reporter_with_istio_labels() -> None:
    t = Telemetry(SLEEP, 15001)
    for _ in range(2):
        t.record_http(SOURCE, HTTPBIN, SERVICE, 200, "-", "unknown", 3.0, 0, 120)
    t.record_http(SOURCE, HTTPBIN, SERVICE, 503, "UF,URX", "unknown", 0.2, 10, 0)
    samples = parse_exposition(t.exposition())
    ok = [(labels, v) for name, labels, v in samples
          if name == "istio_requests_total" and labels["response_code"] == "200"]
    assert len(ok) == 1
    labels, value = ok[0]
    assert value == 2
    assert labels == {
        "reporter": "source", "source_workload": "sleep", "source_workload_namespace": "default",
        "source_principal": "cluster.local/ns/default/sa/sleep", "source_app": "sleep", "source_version": "v1",
        "destination_workload": "httpbin-v1", "destination_workload_namespace": "default",
        "destination_principal": "cluster.local/ns/default/sa/httpbin", "destination_app": "httpbin",
        "destination_version": "v1", "destination_service": "httpbin.default.svc.cluster.local",
        "destination_service_name": "httpbin", "destination_service_namespace": "default",
        "connection_security_policy": "unknown", "request_protocol": "http", "response_code": "200",
        "grpc_response_status": "", "response_flags": "-"}
    failed = [labels for name, labels, _ in samples
              if name == "istio_requests_total" and labels["response_code"] == "503"]
    assert failed[0]["response_flags"] == "UF,URX"


def test_destination_reporter_swaps_sides() -> None:
    t = Telemetry(HTTPBIN, 15001)
    t.record_http(DESTINATION, SLEEP, SERVICE, 200, "-", "mutual_tls", 1.0, 0, 0)
    (labels,) = [labels for name, labels, _ in parse_exposition(t.exposition()) if name == "istio_requests_total"]
    assert (labels["reporter"], labels["source_workload"], labels["destination_workload"]) == (
        "destination", "sleep", "httpbin-v1")
    assert labels["connection_security_policy"] == "mutual_tls"


def test_duration_histogram_uses_envoy_buckets_cumulatively() -> None:
    t = Telemetry(SLEEP, 15001)
    for ms in (0.3, 0.5, 7.0, 7.0, 42.0, 4_000_000.0):
        t.record_http(SOURCE, HTTPBIN, SERVICE, 200, "-", "unknown", ms, 0, 0)
    buckets = {float(labels["le"]): v for name, labels, v in parse_exposition(t.exposition())
               if name == "istio_request_duration_milliseconds_bucket"}
    assert list(buckets) == [*map(float, DURATION_BUCKETS), math.inf]
    assert buckets[0.5] == 2  # le is inclusive
    assert buckets[1] == 2 and buckets[10] == 4 and buckets[50] == 5
    assert buckets[3600000] == 5 and buckets[math.inf] == 6
    values = list(buckets.values())
    assert values == sorted(values)
    totals = {name: v for name, labels, v in parse_exposition(t.exposition())
              if name.startswith("istio_request_duration_milliseconds_") and "le" not in labels}
    assert totals["istio_request_duration_milliseconds_count"] == 6
    assert math.isclose(totals["istio_request_duration_milliseconds_sum"], 4_000_056.8)


def test_exposition_has_help_and_type_for_every_metric() -> None:
    t = Telemetry(SLEEP, 15001)
    t.record_http(SOURCE, HTTPBIN, SERVICE, 200, "-", "unknown", 1.0, 5, 50)
    t.tcp_series(SOURCE, HTTPBIN, SERVICE, "unknown")[0] += 1
    families = {f.name: f.type for f in text_string_to_metric_families(t.exposition())}
    assert families == {
        "istio_requests": "counter", "istio_request_duration_milliseconds": "histogram",
        "istio_request_bytes": "histogram", "istio_response_bytes": "histogram",
        "istio_tcp_connections_opened": "counter", "istio_tcp_connections_closed": "counter",
        "istio_tcp_sent_bytes": "counter", "istio_tcp_received_bytes": "counter"}
    lines = t.exposition().splitlines()
    assert "# TYPE istio_requests_total counter" in lines
    assert "# TYPE istio_request_bytes histogram" in lines


def test_label_values_are_escaped() -> None:
    t = Telemetry(('we"ird\\name', "default", "unknown", "a\nb", "v1"), 15001)
    t.record_http(SOURCE, UNKNOWN_WORKLOAD, SERVICE, 200, "-", "unknown", 1.0, 0, 0)
    (labels,) = [labels for name, labels, _ in parse_exposition(t.exposition()) if name == "istio_requests_total"]
    assert labels["source_workload"] == 'we"ird\\name' and labels["source_app"] == "a\nb"


def test_peer_header_round_trip_and_trust() -> None:
    value = encode_peer(SLEEP, "httpbin.default.svc.cluster.local")
    assert value == b"sleep;default;sleep;v1;httpbin.default.svc.cluster.local"
    assert decode_peer(value) == ("sleep", "default", "sleep", "v1", "httpbin.default.svc.cluster.local")
    assert decode_peer(b"garbage") is None
    t = Telemetry(HTTPBIN, 15001)
    peer, service = t.peer_from_header(value, "cluster.local/ns/default/sa/sleep")
    assert peer == SLEEP and service == SERVICE
    # A namespace that contradicts the client certificate is not believed: only the certificate counts.
    liar = encode_peer(("admin", "kube-system", "", "admin", "v1"), "httpbin.default.svc.cluster.local")
    peer, _ = t.peer_from_header(liar, "cluster.local/ns/default/sa/sleep")
    assert peer == ("unknown", "default", "cluster.local/ns/default/sa/sleep", "unknown", "unknown")


def test_kizuna_counters_exposed() -> None:
    stats = Stats()
    stats.downstream_rq_total = 7
    stats.flag("UF,URX")
    stats.cluster_counters("outbound|80||a")[1] += 3
    samples = parse_exposition(stats_exposition(stats))
    assert ("kizuna_downstream_rq_total", {}, 7) in samples
    assert ("kizuna_response_flags_total", {"flag": "URX"}, 1) in samples
    assert ("kizuna_upstream_rq_total", {"cluster": "outbound|80||a", "class": "2xx"}, 3) in samples


@pytest.mark.parametrize("size, bucket", [(0, 1.0), (1, 1.0), (11, 100.0), (10**9, math.inf)])
def test_size_histogram_bucket(size: int, bucket: float) -> None:
    t = Telemetry(SLEEP, 15001)
    t.record_http(SOURCE, HTTPBIN, SERVICE, 200, "-", "unknown", 1.0, size, 0)
    found = {float(labels["le"]): v for name, labels, v in parse_exposition(t.exposition())
             if name == "istio_request_bytes_bucket"}
    first = next(le for le, v in found.items() if v == 1)
    assert first == bucket


def test_tcp_series_know_the_destination_service_on_both_sides() -> None:
    from dataclasses import replace

    from kizuna.proxyconfig.model import Endpoint, Snapshot
    from kizuna.testing.mesh import service_cluster

    cluster = service_cluster("httpbin", 8000, [])
    endpoint = Endpoint("127.0.0.9", 80, "httpbin-v1", (("app", "httpbin"),), "cluster.local/ns/default/sa/httpbin")
    snapshot = Snapshot("1", clusters=(replace(cluster, service="httpbin.default.svc.cluster.local",
                                               endpoints=(endpoint,)),))
    client, server = Telemetry(SLEEP, 15001), Telemetry(HTTPBIN, 15001)
    for side in (client, server):
        side.index(snapshot)
    assert client.service_at("127.0.0.9", 80) == SERVICE  # where the source's connection went
    assert client.endpoint_at("127.0.0.9", 80)[0] == "httpbin-v1"
    assert server.local_service(80) == SERVICE  # what the destination serves on that port
    assert client.local_service(80)[0] == "unknown" and client.service_at("127.0.0.9", 81)[0] == "unknown"
