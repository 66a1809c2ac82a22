"""Istio's metrics merging without sockets: the merge of the proxy's and the app's expositions (the app's
``# HELP``/``# TYPE`` kept, OpenMetrics' ``# EOF`` dropped, a family the proxy owns never described twice), the
agent's counters, the bootstrap fields that carry the app's endpoint, the runtime reading them from the pod's
``prometheus.io/*`` annotations, and Prometheus' targets on the status port."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kizuna.proxy.merged_metrics import agent_exposition, app_part, merge, metric_names, sample_name
from kizuna.proxyconfig.bootstrap import STATUS_PORT, AppMetrics, Bootstrap, Node
from kizuna.runtime import prometheus
from kizuna.runtime.errors import UserError
from kizuna.runtime.workloads import Instance

PROXY = """\
# HELP istio_requests_total Requests handled by the sidecar (Istio).
# TYPE istio_requests_total counter
istio_requests_total{reporter="destination",response_code="200"} 1
# HELP istio_request_duration_milliseconds Request duration.
# TYPE istio_request_duration_milliseconds histogram
istio_request_duration_milliseconds_bucket{le="+Inf"} 1
istio_request_duration_milliseconds_sum 2.5
istio_request_duration_milliseconds_count 1
# HELP kizuna_retries_total kizuna /stats: retries_total.
# TYPE kizuna_retries_total counter
kizuna_retries_total 0
"""

APP = """\
# HELP myapp_hits_total Hits served.
# TYPE myapp_hits_total counter
myapp_hits_total{path="/"} 3
# HELP myapp_latency_seconds Latency.
# TYPE myapp_latency_seconds histogram
myapp_latency_seconds_bucket{le="0.1"} 2
myapp_latency_seconds_bucket{le="+Inf"} 3
myapp_latency_seconds_sum 0.4
myapp_latency_seconds_count 3
"""


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, parsed by Prometheus' own Python client (which refuses malformed text)."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_merge_keeps_both_expositions_with_the_apps_help_and_type_lines() -> None:
    agent = agent_exposition(4, 0)
    merged = merge(PROXY, APP, agent)
    assert merged.startswith(PROXY)
    assert "# HELP myapp_hits_total Hits served.\n# TYPE myapp_hits_total counter\n" in merged
    assert "# TYPE myapp_latency_seconds histogram\n" in merged
    assert merged.endswith(agent)
    found = samples(merged)
    assert found[("myapp_hits_total", (("path", "/"),))] == 3
    assert found[("myapp_latency_seconds_count", ())] == 3
    assert found[("istio_requests_total", (("reporter", "destination"), ("response_code", "200")))] == 1
    assert found[("istio_agent_scrapes_total", ())] == 4
    assert found[("istio_agent_scrape_failures_total", (("type", "application"),))] == 0


def test_merge_without_app_metrics_is_the_proxys_exposition_and_the_agents() -> None:
    agent = agent_exposition(1, 2)
    assert merge(PROXY, None, agent) == PROXY + agent
    assert merge(PROXY, "", agent) == PROXY + agent
    assert 'istio_agent_scrape_failures_total{type="application"} 2\n' in agent
    # No app endpoint configured: no failure counter to show.
    assert "scrape_failures" not in agent_exposition(1, None)


def test_an_app_family_with_a_proxy_metrics_name_is_left_out_whole() -> None:
    app = ("# HELP istio_requests_total The app's own idea.\n# TYPE istio_requests_total counter\n"
           "istio_requests_total 99\n"
           "# TYPE istio_request_duration_milliseconds histogram\n"
           'istio_request_duration_milliseconds_bucket{le="+Inf"} 7\n'
           "istio_request_duration_milliseconds_count 7\n"
           "kizuna_retries_total 5\n"
           "# TYPE myapp_up gauge\nmyapp_up 1\n")
    merged = merge(PROXY, app)
    assert merged.count("# TYPE istio_requests_total") == 1
    assert merged.count("# TYPE istio_request_duration_milliseconds ") == 1
    assert "99" not in merged and " 7\n" not in merged and "kizuna_retries_total 5" not in merged
    found = samples(merged)  # would raise on a metric described twice
    assert found[("myapp_up", ())] == 1
    assert found[("kizuna_retries_total", ())] == 0


def test_openmetrics_eof_blank_lines_and_crlf_from_the_app_are_normalised() -> None:
    app = "# TYPE myapp_up gauge\r\n\r\nmyapp_up 1\r\n# EOF\r\n"
    merged = merge(PROXY, app, agent_exposition(1, 0))
    assert "# EOF" not in merged and "\r" not in merged
    assert "\n\n" not in merged
    assert samples(merged)[("myapp_up", ())] == 1
    # An app answer without a final newline still ends its last line.
    assert merge("a 1", "b 2") == "a 1\nb 2\n"


def test_names_of_samples_and_families() -> None:
    assert sample_name('foo_total{a="b c"} 1') == "foo_total"
    assert sample_name("foo 1 1700000000") == "foo"
    assert metric_names(PROXY) >= {"istio_requests_total", "istio_request_duration_milliseconds",
                                   "istio_request_duration_milliseconds_bucket", "kizuna_retries_total"}
    # Comments that are not HELP/TYPE are kept (Prometheus ignores them).
    assert app_part("# a comment\nx 1\n", set()) == "# a comment\nx 1\n"


def test_bootstrap_carries_the_status_port_and_the_apps_metrics_endpoint(tmp_path: Path) -> None:
    node = Node("app-0.default", "app", pod_address="127.77.1.2", mesh_address="127.77.1.3", ports=(8080,))
    plain = Bootstrap(node)
    assert plain.status_port == STATUS_PORT == 15020 and plain.app_metrics is None
    assert "statusPort" not in plain.to_json() and "appMetrics" not in plain.to_json()
    merged = replace(plain, status_port=0, app_metrics=AppMetrics(9102, "/custom"))
    path = tmp_path / "bootstrap.json"
    merged.dump(path)
    assert json.loads(path.read_text())["appMetrics"] == {"port": 9102, "path": "/custom"}
    assert Bootstrap.load(path) == merged
    # A bootstrap written before these fields existed still loads, with the defaults.
    old = plain.to_json()
    assert Bootstrap.from_json(old) == plain
    assert AppMetrics.from_json({"port": 1}).path == "/metrics"


def instance(annotations: dict[str, str], ports: tuple[int, ...] = (8080,)) -> Instance:
    return Instance("app-0", "app", "default", "default", (), "127.77.1.2", "127.77.1.3", ports, ("python",), (),
                    "/", None, source="app.yaml", annotations=tuple(sorted(annotations.items())))


def test_the_runtime_reads_the_prometheus_io_annotations() -> None:
    assert prometheus.app_metrics_of(instance({})) is None
    assert prometheus.app_metrics_of(instance({"prometheus.io/scrape": "false",
                                               "prometheus.io/port": "9102"})) is None
    assert prometheus.app_metrics_of(instance({"prometheus.io/scrape": "true", "prometheus.io/port": "9102",
                                               "prometheus.io/path": "/stats"})) == AppMetrics(9102, "/stats")
    # Defaults: Istio's /metrics, and the first container port (Istio's agent would try 80).
    assert prometheus.app_metrics_of(instance({"prometheus.io/scrape": "True"})) == AppMetrics(8080, "/metrics")
    assert prometheus.app_metrics_of(instance({"prometheus.io/scrape": "true"}, ports=())) == AppMetrics(80)
    assert prometheus.app_metrics_of(instance({"prometheus.io/scrape": "true",
                                               "prometheus.io/path": "metrics"})) == AppMetrics(8080, "/metrics")


@pytest.mark.parametrize("port", ["http", "0", "70000", "15020"])
def test_a_bad_prometheus_io_port_is_refused_naming_the_deployment(port: str) -> None:
    with pytest.raises(UserError) as raised:
        prometheus.app_metrics_of(instance({"prometheus.io/scrape": "true", "prometheus.io/port": port}))
    assert "app.yaml: Deployment default/app" in str(raised.value)
    assert "prometheus.io/port" in str(raised.value)


def test_prometheus_scrapes_the_status_port_once_per_proxy() -> None:
    runtime = {"instances": [{"name": "a-0", "namespace": "default", "meshAddress": "127.77.1.3"}],
               "controlPlane": "127.77.1.1:15010", "gateway": {"port": 8080}}
    groups = prometheus.targets_of(runtime)
    assert [g["targets"] for g in groups] == [["127.77.1.3:15020"], ["127.77.1.1:15020"]]
    # 15090 holds a subset of 15020: scraping both would store every istio_* series twice.
    assert not any(t.endswith(":15090") for g in groups for t in g["targets"])
