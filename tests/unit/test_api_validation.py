"""What a user sees when a resource is wrong: one line per problem naming file, resource and field."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import yaml

from kizuna.api import (
    ValidationError,
    dump_json,
    dump_yaml,
    load_documents,
    parse,
    parse_all,
    parse_text,
)
from kizuna.api.destinationrule import DestinationRuleSpec
from kizuna.api.fields import parse_duration
from kizuna.api.virtualservice import VirtualServiceSpec
from kizuna.api.workloads import DeploymentSpec, ServiceAccountSpec, ServiceSpec

VS_HEAD = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts: [reviews]
"""


def errors_of(text: str, source: str = "vs.yaml") -> list[str]:
    with pytest.raises(ValidationError) as info:
        parse_all(parse_text(textwrap.dedent(text), source))
    return info.value.errors


def test_weight_out_of_range_names_file_resource_and_field() -> None:
    errors = errors_of(VS_HEAD + """\
  http:
  - route:
    - destination: {host: reviews, subset: v1}
      weight: 50
    - destination: {host: reviews, subset: v2}
      weight: 150
""")
    assert errors == ["vs.yaml: VirtualService default/reviews: spec.http[0].route[1].weight: "
                      "must be between 0 and 100"]


def test_unknown_field_is_rejected_with_its_path() -> None:
    errors = errors_of(VS_HEAD + """\
  http:
  - route:
    - destination: {host: reviews}
      wieght: 100
""")
    assert errors == ["vs.yaml: VirtualService default/reviews: spec.http[0].route[0].wieght: unknown field"]


def test_bad_duration() -> None:
    errors = errors_of(VS_HEAD + """\
  http:
  - route: [{destination: {host: reviews}}]
    timeout: 10
    retries: {attempts: 3, perTryTimeout: 2 seconds}
""")
    assert errors == [
        "vs.yaml: VirtualService default/reviews: spec.http[0].timeout: "
        "must be a duration like 1.5s, 500ms or 1m",
        "vs.yaml: VirtualService default/reviews: spec.http[0].retries.perTryTimeout: "
        "must be a duration like 1.5s, 500ms or 1m",
    ]


def test_zero_timeout_is_rejected_like_istio() -> None:
    errors = errors_of(VS_HEAD + """\
  http:
  - route: [{destination: {host: reviews}}]
    timeout: 0s
""")
    assert errors == ["vs.yaml: VirtualService default/reviews: spec.http[0].timeout: must be at least 1ms"]


def test_bad_regex() -> None:
    errors = errors_of(VS_HEAD + """\
  http:
  - match:
    - uri: {regex: "/api/(v1"}
    route: [{destination: {host: reviews}}]
""")
    assert len(errors) == 1
    assert errors[0].startswith("vs.yaml: VirtualService default/reviews: spec.http[0].match[0].uri.regex: "
                                "invalid regular expression '/api/(v1': ")


def test_string_match_needs_exactly_one_kind() -> None:
    errors = errors_of(VS_HEAD + """\
  http:
  - match:
    - uri: {prefix: /a, exact: /a}
    - method: {}
    - headers: {end-user: {}}
    route: [{destination: {host: reviews}}]
""")
    assert errors == [
        "vs.yaml: VirtualService default/reviews: spec.http[0].match[0].uri: "
        "only one of exact, prefix, regex may be set (got exact, prefix)",
        "vs.yaml: VirtualService default/reviews: spec.http[0].match[1].method: "
        "must set exactly one of exact, prefix or regex",
    ]


def test_route_needs_an_action_and_destination_host() -> None:
    errors = errors_of(VS_HEAD + """\
  http:
  - match: [{uri: {prefix: /}}]
  - route: [{destination: {subset: v1}}]
  - route: [{destination: {host: reviews}}]
    redirect: {uri: /elsewhere}
""")
    assert errors == [
        "vs.yaml: VirtualService default/reviews: spec.http[0]: "
        "one of route, redirect, directResponse or delegate is required",
        "vs.yaml: VirtualService default/reviews: spec.http[1].route[0].destination.host: required",
        "vs.yaml: VirtualService default/reviews: spec.http[2]: "
        "only one of route, redirect, directResponse or delegate may be set (got route, redirect)",
    ]


def test_hosts_may_only_be_left_out_by_a_delegate() -> None:
    base = "apiVersion: networking.istio.io/v1beta1\nkind: VirtualService\nmetadata: {name: r}\n"
    # No hosts: a delegate (Istio), so it may not delegate again; a host itself must not be empty.
    (delegate,) = parse_all(parse_text(base + "spec: {http: [{route: [{destination: {host: r}}]}]}\n", "vs.yaml"))
    assert isinstance(delegate.spec, VirtualServiceSpec) and delegate.spec.is_delegate
    assert errors_of(base + "spec: {http: [{delegate: {name: x}}]}\n") == [
        "vs.yaml: VirtualService default/r: spec.http[0].delegate: a delegate cannot delegate again (one level only)"]
    assert errors_of(base + "spec: {hosts: [''], http: [{route: [{destination: {host: r}}]}]}\n") == [
        "vs.yaml: VirtualService default/r: spec.hosts[0]: must not be empty"]


def test_retries_attempts_must_not_be_negative() -> None:
    errors = errors_of(VS_HEAD + """\
  http:
  - route: [{destination: {host: reviews}}]
    retries: {attempts: -1}
""")
    assert errors == ["vs.yaml: VirtualService default/reviews: spec.http[0].retries.attempts: "
                      "must not be negative"]


def test_destination_rule_checks() -> None:
    errors = errors_of("""\
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata: {name: reviews, namespace: prod}
spec:
  host: reviews
  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBINS}
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v1, labels: {version: v2}}
  - labels: {version: v3}
""", "dr.yaml")
    assert errors == [
        "dr.yaml: DestinationRule prod/reviews: spec.trafficPolicy.loadBalancer.simple: must be one of "
        "'UNSPECIFIED', 'LEAST_CONN', 'RANDOM', 'PASSTHROUGH', 'ROUND_ROBIN' or 'LEAST_REQUEST' "
        "(got 'ROUND_ROBINS')",
        "dr.yaml: DestinationRule prod/reviews: spec.subsets[2].name: required",
    ]
    errors = errors_of("""\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v1, labels: {version: v2}}
""", "dr.yaml")
    assert errors == ["dr.yaml: DestinationRule default/reviews: spec.subsets[1].name: "
                      "duplicate subset name 'v1'"]
    errors = errors_of("""\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  trafficPolicy: {}
""", "dr.yaml")
    assert errors == ["dr.yaml: DestinationRule default/reviews: spec.host: required",
                      "dr.yaml: DestinationRule default/reviews: spec.trafficPolicy: "
                      "must set at least one policy"]


def test_unsupported_kind_is_one_line() -> None:
    errors = errors_of("""\
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: default}
spec: {egress: [{hosts: ["./*"]}]}
""", "sidecar.yaml")
    assert errors == ["sidecar.yaml: Sidecar default/default: kind Sidecar (networking.istio.io/v1) "
                      "is not supported yet"]


def test_wrong_api_version_and_missing_kind() -> None:
    errors = errors_of("""\
apiVersion: apps/v1beta1
kind: Deployment
metadata: {name: web}
---
apiVersion: v1
metadata: {name: web}
""", "x.yaml")
    assert errors == ["x.yaml: Deployment default/web: apiVersion: apps/v1beta1 is not supported for "
                      "Deployment (use apps/v1)",
                      "x.yaml: document 2: kind: required"]


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("apiVersion: v1\nkind: Service\nmetadata:\n  name: a\n   namespace: b\n")
    with pytest.raises(ValidationError) as info:
        load_documents([path])
    assert info.value.errors == [f"{path}:5: mapping values are not allowed here"]


def test_duplicate_key_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text(VS_HEAD + "  http: []\n  http: []\n")
    with pytest.raises(ValidationError) as info:
        load_documents([path])
    assert info.value.errors == [f"{path}:8: duplicate key 'http'"]


def test_parse_all_is_atomic_and_reports_every_document(tmp_path: Path) -> None:
    good = tmp_path / "a-good.yaml"
    good.write_text("apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: sa}\n")
    bad = tmp_path / "b-bad.yaml"
    bad.write_text("apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 0}]}\n---\n"
                   "apiVersion: v1\nkind: Service\nmetadata: {name: t}\n"
                   "spec: {ports: [{port: 80, proto: x}]}\n"
                   "---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n"
                   "spec: {selector: {matchLabels: {app: d}}, template: {spec: {containers: []}}}\n")
    docs = load_documents([tmp_path])
    assert [d.source for d in docs] == [str(good), str(bad), str(bad), str(bad)]
    with pytest.raises(ValidationError) as info:
        parse_all(docs)
    assert info.value.errors == [
        f"{bad}: Service default/s: spec.ports[0].port: must be between 1 and 65535",
        f"{bad}: Deployment default/d: spec.template.spec.containers: must not be empty",
    ]
    assert str(info.value) == "\n".join(info.value.errors)


def test_same_resource_twice_in_one_batch() -> None:
    text = "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: sa}\n"
    errors = errors_of(text + "---\n" + text, "sa.yaml")
    assert errors == ["sa.yaml: ServiceAccount default/sa: defined more than once (also in document 1)"]


def test_directory_walk_is_recursive_sorted_and_skips_other_files(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "2.yml").write_text("apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: two}\n")
    (tmp_path / "a.json").write_text(json.dumps({"apiVersion": "v1", "kind": "ServiceAccount",
                                                 "metadata": {"name": "one"}}))
    (tmp_path / "c.yaml").write_text("---\n---\n# only comments\n")
    (tmp_path / "notes.txt").write_text("not yaml: [")
    names = [d.raw["metadata"]["name"] for d in load_documents([tmp_path])]
    assert names == ["one", "two"]
    with pytest.raises(ValidationError) as info:
        load_documents([tmp_path / "missing.yaml"])
    assert info.value.errors == [f"{tmp_path / 'missing.yaml'}: no such file or directory"]


def test_namespace_defaults_and_key() -> None:
    (doc,) = parse_text("apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: sa}\n", "sa.yaml")
    resource = parse(doc)
    assert resource.key == ("ServiceAccount", "default", "sa")
    assert isinstance(resource.spec, ServiceAccountSpec)
    assert resource.raw == doc.raw and resource.raw is not doc.raw
    assert resource.manifest()["metadata"] == {"name": "sa", "namespace": "default"}
    assert parse(doc, default_namespace="foo").key == ("ServiceAccount", "foo", "sa")


def test_kubernetes_kinds_expose_what_the_runtime_needs() -> None:
    docs = parse_text("""\
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports:
  - {name: http, port: 8000, targetPort: http, appProtocol: http}
  - {name: metrics, port: 9090}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, labels: {app: web}}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web, version: v1}}
    spec:
      volumes: [{name: tmp, emptyDir: {}}]
      containers:
      - name: web
        image: example/web
        imagePullPolicy: IfNotPresent
        command: [python, -m, http.server]
        args: ["8080"]
        workingDir: /srv
        env:
        - {name: MODE, value: fast}
        - name: POD_IP
          valueFrom: {fieldRef: {fieldPath: status.podIP}}
        ports: [{containerPort: 8080, name: http}]
        readinessProbe:
          httpGet: {path: /ready, port: http}
          periodSeconds: 2
""", "web.yaml")
    service, deployment = parse_all(docs)
    assert isinstance(service.spec, ServiceSpec) and isinstance(deployment.spec, DeploymentSpec)
    http, metrics = service.spec.ports
    assert (http.target, http.protocol, http.app_protocol) == ("http", "TCP", "http")
    assert metrics.target == 9090
    spec = deployment.spec
    assert spec.replicas == 2 and spec.service_account_name == "default"
    assert spec.template.metadata.labels == {"app": "web", "version": "v1"}
    c = spec.container
    assert (c.name, c.image, c.command, c.args, c.working_dir) == (
        "web", "example/web", ["python", "-m", "http.server"], ["8080"], "/srv")
    assert [(e.name, e.value) for e in c.env] == [("MODE", "fast"), ("POD_IP", None)]
    field_ref = c.env[1].value_from.field_ref if c.env[1].value_from else None
    assert field_ref is not None and field_ref.field_path == "status.podIP"
    assert spec.container_port("http") == 8080 and spec.container_port("grpc") is None
    probe = c.readiness_probe
    assert probe is not None and probe.http_get is not None
    assert (probe.http_get.path, probe.http_get.port, probe.period_seconds, probe.timeout_seconds) == (
        "/ready", "http", 2, 1)


def test_deployment_selector_must_match_template() -> None:
    errors = errors_of("""\
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: -1
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: other}}
    spec: {containers: [{name: web}]}
""", "d.yaml")
    assert errors == ["d.yaml: Deployment default/web: spec.replicas: must not be negative"]
    errors = errors_of("""\
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: other}}
    spec: {containers: [{name: web}]}
""", "d.yaml")
    assert errors == ["d.yaml: Deployment default/web: spec.template.metadata.labels: "
                      "must include the selector's matchLabels (app=web)"]


EVERY_VS_FIELD = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: everything, namespace: shop}
spec:
  hosts: [reviews, reviews.shop.svc.cluster.local]
  gateways: [mesh, shop/gw]
  exportTo: ["."]
  http:
  - name: all
    match:
    - name: m
      uri: {prefix: /api}
      scheme: {exact: http}
      method: {regex: "GET|HEAD"}
      authority: {prefix: reviews}
      headers: {end-user: {exact: jason}, x-present: {}}
      port: 9080
      sourceLabels: {app: productpage}
      gateways: [mesh]
      queryParams: {debug: {exact: "1"}}
      ignoreUriCase: true
      withoutHeaders: {x-skip: {regex: "*"}}
      sourceNamespace: shop
      statPrefix: api
    route:
    - destination: {host: reviews, subset: v1, port: {number: 9080}}
      weight: 90
      headers: {request: {set: {x-a: "1"}, add: {x-b: "2"}, remove: [x-c]}, response: {remove: [server]}}
    - destination: {host: reviews, subset: v2}
      weight: 10
    rewrite: {uri: /v2, authority: reviews-v2}
    timeout: 1.5s
    retries:
      attempts: 3
      perTryTimeout: 500ms
      retryOn: gateway-error,connect-failure,503
      retryRemoteLocalities: true
      retryIgnorePreviousHosts: true
      backoff: 25ms
    fault:
      delay: {fixedDelay: 1h30m, percentage: {value: 0.5}}
      abort: {httpStatus: 503, percentage: {value: 1}}
    mirror: {host: reviews, subset: v3}
    mirrorPercentage: {value: 12.5}
    corsPolicy:
      allowOrigins: [{exact: "https://example.com"}]
      allowMethods: [GET, POST]
      allowHeaders: [x-a]
      exposeHeaders: [x-b]
      maxAge: 24h
      allowCredentials: false
      unmatchedPreflights: IGNORE
    headers: {request: {set: {x-d: "4"}}}
  - name: mirrors
    route: [{destination: {host: reviews}}]
    mirrors: [{destination: {host: reviews, subset: v3}, percentage: {value: 5}}]
    rewrite: {uriRegexRewrite: {match: "^/old/(.*)$", rewrite: "/new/\\\\1"}}
    fault: {delay: {exponentialDelay: 1s}, abort: {grpcStatus: UNAVAILABLE}}
  - name: redirect
    match: [{uri: {exact: /old}}]
    redirect: {uri: /new, authority: other, port: 8080, scheme: https, redirectCode: 308}
  - name: direct
    match: [{uri: {exact: /teapot}}]
    directResponse: {status: 418, body: {string: short and stout}}
  - name: delegated
    match: [{uri: {prefix: /delegated}}]
    delegate: {name: other, namespace: shop}
  tcp:
  - match:
    - {destinationSubnets: [10.0.0.0/8], port: 9000, sourceSubnet: 10.1.0.0/16, sourceLabels: {app: a},
       gateways: [mesh], sourceNamespace: shop}
    route: [{destination: {host: reviews, port: {number: 9000}}, weight: 100}]
  tls:
  - match:
    - {sniHosts: [reviews.shop.svc.cluster.local], destinationSubnets: [10.0.0.1/32], port: 443,
       sourceLabels: {app: a}, gateways: [mesh], sourceNamespace: shop}
    route: [{destination: {host: reviews}}]
"""

EVERY_DR_FIELD = """\
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {name: everything, namespace: shop}
spec:
  host: reviews
  exportTo: ["."]
  workloadSelector: {matchLabels: {app: productpage}}
  trafficPolicy:
    loadBalancer:
      consistentHash:
        httpCookie: {name: session, path: /, ttl: 0s, attributes: [{name: SameSite, value: Strict}]}
        ringHash: {minimumRingSize: 1024}
      localityLbSetting:
        distribute: [{from: us-west/*, to: {"us-west/*": 80, "us-east/*": 20}}]
        failover: [{from: us-east, to: eu-west}]
        failoverPriority: [topology.kubernetes.io/region]
        enabled: true
      warmup: {duration: 30s, minimumPercent: 10, aggression: 1.5}
    connectionPool:
      tcp:
        maxConnections: 100
        connectTimeout: 30ms
        tcpKeepalive: {probes: 3, time: 7200s, interval: 75s}
        maxConnectionDuration: 1h
        idleTimeout: 0s
      http:
        http1MaxPendingRequests: 1
        http2MaxRequests: 1000
        maxRequestsPerConnection: 10
        maxRetries: 3
        idleTimeout: 1h
        h2UpgradePolicy: DO_NOT_UPGRADE
        useClientProtocol: true
        maxConcurrentStreams: 100
    outlierDetection:
      consecutiveErrors: 7
      splitExternalLocalOriginErrors: true
      consecutiveLocalOriginFailures: 2
      consecutiveGatewayErrors: 3
      consecutive5xxErrors: 5
      interval: 10s
      baseEjectionTime: 3m
      maxEjectionPercent: 100
      minHealthPercent: 0
    tls:
      mode: MUTUAL
      clientCertificate: /etc/certs/cert.pem
      privateKey: /etc/certs/key.pem
      caCertificates: /etc/certs/ca.pem
      credentialName: creds
      subjectAltNames: [spiffe://cluster.local/ns/shop/sa/reviews]
      sni: reviews.shop
      insecureSkipVerify: false
      caCrl: /etc/certs/crl.pem
    portLevelSettings:
    - port: {number: 9080}
      loadBalancer: {simple: ROUND_ROBIN, warmupDurationSecs: 10s}
      connectionPool: {tcp: {connectTimeout: 1s}}
      outlierDetection: {consecutive5xxErrors: 1}
      tls: {mode: ISTIO_MUTUAL}
    proxyProtocol: {version: V2}
    retryBudget: {percent: 20, minRetryConcurrency: 3, budgetInterval: 10s}
  subsets:
  - name: v1
    labels: {version: v1}
    trafficPolicy:
      loadBalancer:
        consistentHash: {httpHeaderName: x-user, maglev: {tableSize: 65537}}
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      tunnel: {protocol: CONNECT, targetHost: egress.example.com, targetPort: 8443}
      loadBalancer: {simple: LEAST_CONN}
"""


def test_every_virtual_service_field_parses() -> None:
    (resource,) = parse_all(parse_text(EVERY_VS_FIELD, "vs.yaml"))
    spec = resource.spec
    assert isinstance(spec, VirtualServiceSpec)
    route = spec.http[0]
    assert route.timeout == 1.5 and route.retries is not None and route.retries.per_try_timeout == 0.5
    assert route.fault is not None and route.fault.delay is not None
    assert route.fault.delay.fixed_delay == 5400.0 and route.fault.delay.share == 0.5
    assert route.route[0].headers is not None and route.route[0].headers.request is not None
    assert route.route[0].headers.request.set_ == {"x-a": "1"}
    assert route.match[0].headers["x-present"].exact is None
    assert spec.http[2].redirect is not None and spec.http[2].redirect.redirect_code == 308
    assert spec.http[3].direct_response is not None and spec.http[3].direct_response.status == 418
    assert spec.tls[0].match[0].sni_hosts == ["reviews.shop.svc.cluster.local"]


def test_every_destination_rule_field_parses() -> None:
    (resource,) = parse_all(parse_text(EVERY_DR_FIELD, "dr.yaml"))
    spec = resource.spec
    assert isinstance(spec, DestinationRuleSpec)
    policy = spec.traffic_policy
    assert policy is not None and policy.outlier_detection is not None
    assert policy.outlier_detection.consecutive_5xx_errors == 5
    assert policy.connection_pool is not None and policy.connection_pool.tcp is not None
    assert policy.connection_pool.tcp.connect_timeout == pytest.approx(0.03)
    assert policy.connection_pool.tcp.idle_timeout == 0.0
    level = policy.for_port(9080)
    assert level is not None and level.load_balancer is not None
    assert level.load_balancer.simple == "ROUND_ROBIN"
    assert [s.name for s in spec.subsets] == ["v1", "v2"]


def test_round_trip_through_dump_keeps_the_resource() -> None:
    (resource,) = parse_all(parse_text(EVERY_VS_FIELD, "vs.yaml"))
    again = parse_all(parse_text(dump_yaml(resource.raw), "again.yaml"))[0]
    assert again.spec == resource.spec
    listed = dump_json([resource.raw, {**resource.raw, "metadata": {"name": "copy"}}])
    assert json.loads(listed)["kind"] == "List"
    assert [r.name for r in parse_all(parse_text(listed, "list.json"))] == ["everything", "copy"]
    assert yaml.safe_load(dump_json(resource.raw)) == resource.raw
    assert dump_yaml([{"a": 1}, {"b": 2}]) == "a: 1\n---\nb: 2\n"


def test_null_fields_read_as_unset() -> None:
    (resource,) = parse_all(parse_text(VS_HEAD + "  gateways:\n  http:\n  - match:\n    route: "
                                       "[{destination: {host: reviews}}]\n", "vs.yaml"))
    assert isinstance(resource.spec, VirtualServiceSpec)
    assert resource.spec.gateways == [] and resource.spec.http[0].match == []


@pytest.mark.parametrize(("text", "seconds"), [
    ("1.5s", 1.5), ("500ms", 0.5), ("3m", 180.0), ("1h30m", 5400.0), ("0", 0.0), ("250us", 0.00025),
    ("1m0.5s", 60.5), (".5s", 0.5),
])
def test_go_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "1.5", "s", "1 s", "1d", "-", "1.5.5s", "ms500"])
def test_bad_go_durations(text: str) -> None:
    with pytest.raises(ValueError, match="must be a duration like 1.5s, 500ms or 1m"):
        parse_duration(text)
