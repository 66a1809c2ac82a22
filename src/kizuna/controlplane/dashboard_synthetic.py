"""A synthetic mesh for the dashboard: N services in a tree behind an ingress gateway, each with a v1 and a v2
workload, whose proxies "serve" Istio metrics in Prometheus text that grow on every scrape.

It exists to show and test the dashboard at scale without starting hundreds of processes (the 100-service
responsiveness test), and to try the front end: ``python -m kizuna.controlplane.dashboard_synthetic
[--services N] [--listen 127.0.0.1:20002]``.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from kizuna.controlplane.dashboard import Dashboard, Target
from kizuna.controlplane.dashboard_graph import Member, ServiceInfo, Topology
from kizuna.controlplane.dashboard_metrics import DURATION_BOUNDS, Workload
from kizuna.controlplane.traces import TraceStore

NAMESPACE = "default"
GATEWAY = Workload("istio-system", "istio-ingressgateway", "istio-ingressgateway", "unknown")
REQUESTS_PER_SCRAPE = 50
ERROR_EVERY = 7
"""Every seventh service answers 10% of its requests with 503."""


def service_name(index: int) -> str:
    return f"svc-{index:03d}"


class SyntheticMesh:
    """``MeshView`` plus a ``fetch`` for ``services`` services: svc-000 is called by the gateway, and svc-i
    calls svc-(2i+1) and svc-(2i+2). Each call is counted by the destination's proxy over mutual TLS."""

    def __init__(self, services: int = 100) -> None:
        self.count = services
        self.trace_store = TraceStore()
        for number in range(3):
            self.trace_store.add_otlp(synthetic_trace(number, depth=min(4, services)))
        self.scrapes: dict[str, int] = {}
        self._workloads = {service_name(i): (Workload(NAMESPACE, f"{service_name(i)}-v1", service_name(i), "v1"),
                                             Workload(NAMESPACE, f"{service_name(i)}-v2", service_name(i), "v2"))
                           for i in range(services)}

    def callers(self, index: int) -> list[Workload]:
        """Who calls service ``index``: the gateway (svc-000) or both workloads of its parent."""
        return [GATEWAY] if index == 0 else list(self._workloads[service_name((index - 1) // 2)])

    def topology(self) -> Topology:
        services = tuple(ServiceInfo(NAMESPACE, name, pair) for name, pair in self._workloads.items())
        members = tuple(Member(w) for pair in self._workloads.values() for w in pair) + (Member(GATEWAY, True),)
        return Topology(services, members, frozenset({GATEWAY}))

    def targets(self) -> list[Target]:
        return [Target(w.id, f"synthetic://{w.id}") for pair in self._workloads.values() for w in pair]

    def resources(self, kind: str) -> list[dict[str, Any]]:
        if kind != "DestinationRule":
            return []
        return [{"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
                 "metadata": {"name": name, "namespace": NAMESPACE},
                 "spec": {"host": name, "subsets": [{"name": "v1", "labels": {"version": "v1"}},
                                                    {"name": "v2", "labels": {"version": "v2"}}]}}
                for name in self._workloads]

    def proxy_status(self) -> list[dict[str, Any]]:
        return [{"id": f"{w.name}-0.{NAMESPACE}", "workload": w.name, "namespace": NAMESPACE, "connected": True,
                 "ready": True, "ackedVersion": "1-synthetic", "synced": True, "nack": None, "error": None}
                for pair in self._workloads.values() for w in pair]

    def prometheus(self) -> str | None:
        return None

    def traces(self, limit: int) -> list[dict[str, Any]]:
        return self.trace_store.summaries(limit)

    def trace(self, trace_id: str) -> list[dict[str, Any]] | None:
        return self.trace_store.trace(trace_id)

    async def fetch(self, url: str) -> str:
        """The Prometheus text of the proxy ``url`` names (``synthetic://ns/workload``)."""
        workload_id = url.removeprefix("synthetic://")
        rounds = self.scrapes[workload_id] = self.scrapes.get(workload_id, 0) + 1
        namespace, name = workload_id.split("/", 1)
        service = name.rsplit("-", 1)[0]
        index = int(service.rsplit("-", 1)[1])
        me = next(w for w in self._workloads[service] if w.name == name)
        return exposition(me, self.callers(index), f"{service}.{namespace}.svc.cluster.local", rounds,
                          errors=index % ERROR_EVERY == 3)


def synthetic_trace(number: int, depth: int) -> dict[str, Any]:
    """An OTLP/JSON export of one trace: the gateway calls svc-000, which calls svc-001 ..., each hop a client
    span and a server span, 2 ms apart; the last hop of trace 2 fails."""
    trace_id = f"{number + 1:032x}"
    start = 1_700_000_000_000_000_000 + number * 1_000_000_000
    resources = []
    parent = ""
    for hop in range(depth):
        caller = "istio-ingressgateway" if hop == 0 else service_name(hop - 1)
        callee = service_name(hop)
        begin, end = start + hop * 2_000_000, start + (2 * depth - hop) * 2_000_000
        client_id, server_id = f"{number:02x}{hop:02x}c".ljust(16, "0"), f"{number:02x}{hop:02x}5".ljust(16, "0")
        failed = number == 2 and hop == depth - 1
        for service, span_id, parent_id, kind, offset in ((caller, client_id, parent, 3, 0),
                                                          (callee, server_id, client_id, 2, 500_000)):
            span = {"traceId": trace_id, "spanId": span_id, "parentSpanId": parent_id, "kind": kind,
                    "name": f"{callee}.{NAMESPACE}.svc.cluster.local:80/*", "startTimeUnixNano": begin + offset,
                    "endTimeUnixNano": end - offset, "status": {"code": 2 if failed else 0},
                    "attributes": [{"key": "http.status_code", "value": {"intValue": "503" if failed else "200"}}]}
            resources.append({"resource": {"attributes": [{"key": "service.name", "value": {"stringValue": service}}]},
                              "scopeSpans": [{"spans": [span]}]})
        parent = server_id
    return {"resourceSpans": resources}


def exposition(destination: Workload, sources: list[Workload], fqdn: str, rounds: int, errors: bool) -> str:
    """Istio-style destination-reported counters after ``rounds`` scrapes of traffic from ``sources``."""
    lines = ["# TYPE istio_requests_total counter"]
    buckets: list[str] = ["# TYPE istio_request_duration_milliseconds histogram"]
    for source in sources:
        total = rounds * REQUESTS_PER_SCRAPE
        failed = total // 10 if errors else 0
        for code, count in (("200", total - failed), ("503", failed)):
            if not count:
                continue
            base = (f'reporter="destination",source_workload="{source.name}",'
                    f'source_workload_namespace="{source.namespace}",source_app="{source.app}",'
                    f'source_version="{source.version}",destination_workload="{destination.name}",'
                    f'destination_workload_namespace="{destination.namespace}",destination_app="{destination.app}",'
                    f'destination_version="{destination.version}",destination_service="{fqdn}",'
                    f'connection_security_policy="mutual_tls",response_code="{code}",response_flags="-"')
            lines.append(f"istio_requests_total{{{base}}} {count}")
            # Latency: 80% under 10 ms, 19% under 50 ms, 1% under 250 ms.
            for bound in DURATION_BOUNDS:
                share = 0.8 if bound >= 10 else 0.0
                share += 0.19 if bound >= 50 else 0.0
                share += 0.01 if bound >= 250 else 0.0
                buckets.append(f'istio_request_duration_milliseconds_bucket{{{base},le="{bound:g}"}} '
                               f"{int(count * share)}")
            buckets.append(f'istio_request_duration_milliseconds_bucket{{{base},le="+Inf"}} {count}')
    return "\n".join(lines + buckets) + "\n"


async def _main(services: int, listen: str, interval: float) -> None:
    mesh = SyntheticMesh(services)
    board = Dashboard(mesh, fetch=mesh.fetch, interval=interval)
    host, _, port = listen.rpartition(":")
    bound = await board.start(host, int(port))
    print(f"http://{bound[0]}:{bound[1]}/", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await board.close()


def main() -> None:
    parser = argparse.ArgumentParser(description="serve the dashboard over a synthetic mesh")
    parser.add_argument("--services", type=int, default=100)
    parser.add_argument("--listen", default="127.0.0.1:20002")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between scrapes")
    args = parser.parse_args()
    try:
        asyncio.run(_main(args.services, args.listen, args.interval))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
