"""The dashboard: a plain-HTTP, read-only listener of the control plane (Kiali's port, 20001) serving the
built front end (``kizuna/dashboard/static``) and its JSON API, filled by a background scrape task.

- ``GET /api/graph[?window=SECONDS]``: the service graph with rates over the window (default 60 s).
- ``GET /api/services/<namespace>/<name>``: golden-signal series, the edges in and out, the VirtualServices
  and DestinationRules that apply, and the push status of the service's proxies.
- ``GET /api/proxies``: every proxy's push status (as ``GET /v1/status``).
- ``GET /api/traces[?limit=N]``, ``GET /api/traces/<trace id>``: recent traces from the control plane's
  embedded trace store (summaries), and one trace's spans for the waterfall.

Every ``SCRAPE_INTERVAL`` the scraper fetches ``/stats/prometheus`` from each registered proxy's Prometheus
port (15090 on its mesh address, the gateway's too) with bounded concurrency and a timeout, subtracts the
previous scrape of the same proxy and stores the interval in a bounded ``History``. A proxy that vanishes from
the registry, or fails a scrape, is dropped and starts afresh when it is back. The listener needs no token:
it only reads, and it is meant for loopback.
"""

from __future__ import annotations

import asyncio
import json
import logging
import mimetypes
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote, unquote, urlsplit

from kizuna.controlplane.dashboard_graph import (
    History,
    Member,
    Point,
    ServiceInfo,
    Topology,
    graph,
    rules_for,
    service_series,
)
from kizuna.controlplane.dashboard_metrics import WANTED, Counters, Workload, counters_of, delta, interval_of, parse
from kizuna.controlplane.httpserver import HttpServer, Request, Response, error_response, json_response

log = logging.getLogger("kizuna.controlplane.dashboard")

DEFAULT_PORT = 20001
"""Kiali's port."""
SCRAPE_INTERVAL = 5.0
HISTORY_SECONDS = 600.0
SCRAPE_TIMEOUT = 2.0
SCRAPE_CONCURRENCY = 16
MAX_SCRAPE_BYTES = 16 * 1024 * 1024
PROMETHEUS_PORT = 15090
PROMETHEUS_PATH = "/stats/prometheus"

Fetch = Callable[[str], Awaitable[str]]
"""Fetches one URL's body as text; raises on any failure."""


@dataclass(frozen=True, slots=True)
class Target:
    """One proxy to scrape."""

    id: str
    url: str


class MeshView(Protocol):
    """What the dashboard reads from the control plane (or a synthetic mesh in tests)."""

    def topology(self) -> Topology: ...

    def targets(self) -> list[Target]: ...

    def resources(self, kind: str) -> list[dict[str, Any]]: ...

    def proxy_status(self) -> list[dict[str, Any]]: ...

    def prometheus(self) -> str | None:
        """``host:port`` of a Prometheus that scrapes the mesh's proxies, or None to scrape them directly."""

    def traces(self, limit: int) -> list[dict[str, Any]]:
        """Summaries of the most recent traces, newest first."""

    def trace(self, trace_id: str) -> list[dict[str, Any]] | None:
        """One trace's spans by start time, or None when it is not (or no longer) kept."""


def workload_of(labels: dict[str, str], namespace: str, name: str) -> Workload:
    """A node's graph identity, with Istio's canonical app and version from its labels."""
    app = (labels.get("service.istio.io/canonical-name") or labels.get("app.kubernetes.io/name")
           or labels.get("app") or "unknown")
    version = (labels.get("service.istio.io/canonical-revision") or labels.get("app.kubernetes.io/version")
               or labels.get("version") or "unknown")
    return Workload(namespace, name, app, version)


class ControlPlaneView:
    """``MeshView`` over the control plane's own store, registry and push queue (same process, no API)."""

    def __init__(self, store: Any, registry: Any, pusher: Any, state_dir: Path | None = None,
                 traces: Any = None) -> None:
        self.traces_store = traces
        """The control plane's ``TraceStore`` (None: no traces to show)."""
        self.store = store
        self.registry = registry
        self.pusher = pusher
        self.state_dir = state_dir
        """Where ``runtime.json`` says whether ``kizuna up`` started a Prometheus."""

    def topology(self) -> Topology:
        described = self.registry.describe([r.manifest() for r in self.store.list(kind="Service")])
        nodes = {n["id"]: n for n in described["instances"]}

        def workload(node: dict[str, Any]) -> Workload:
            return workload_of(dict(node.get("labels") or {}), str(node["namespace"]), str(node["workload"]))

        services = tuple(ServiceInfo(s["namespace"], s["name"], tuple(sorted(
            {workload(nodes[i["id"]]) for i in s["instances"] if i["id"] in nodes}))) for s in described["services"])
        members = tuple(Member(workload(n), n.get("kind") == "gateway") for n in nodes.values())
        return Topology(services, members, frozenset(m.workload for m in members if m.gateway))

    def targets(self) -> list[Target]:
        return [Target(r.node.id, f"http://{_host(r.node.mesh_address)}:{PROMETHEUS_PORT}{PROMETHEUS_PATH}")
                for r in self.registry.registrations() if r.connected]

    def resources(self, kind: str) -> list[dict[str, Any]]:
        return [r.manifest() for r in self.store.list(kind=kind)]

    def proxy_status(self) -> list[dict[str, Any]]:
        return list(self.pusher.status()["proxies"])

    def prometheus(self) -> str | None:
        if self.state_dir is None:
            return None
        try:
            runtime = json.loads((self.state_dir / "runtime.json").read_text())
        except (OSError, ValueError):
            return None
        address = runtime.get("prometheus") if isinstance(runtime, dict) else None
        return str(address) if address else None

    def traces(self, limit: int) -> list[dict[str, Any]]:
        return list(self.traces_store.summaries(limit)) if self.traces_store is not None else []

    def trace(self, trace_id: str) -> list[dict[str, Any]] | None:
        return self.traces_store.trace(trace_id) if self.traces_store is not None else None


def _host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


async def http_get(url: str, timeout: float = SCRAPE_TIMEOUT) -> str:
    """GET ``url`` (plain HTTP/1.1) and return its body; raises OSError/TimeoutError/ValueError on failure."""
    parts = urlsplit(url)
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port or 80)
        try:
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            writer.write(f"GET {target} HTTP/1.1\r\nHost: {parts.netloc}\r\nConnection: close\r\n"
                         "Accept: text/plain\r\n\r\n".encode("latin-1"))
            data = bytearray()
            while chunk := await reader.read(65536):
                data += chunk
                if len(data) > MAX_SCRAPE_BYTES:
                    raise ValueError(f"{url}: answer larger than {MAX_SCRAPE_BYTES} bytes")
        finally:
            writer.close()
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    if not lines[0].startswith("HTTP/1.") or lines[0].split(" ")[1:2] != ["200"]:
        raise ValueError(f"{url}: {lines[0]!r}")
    if any(line.lower().replace(" ", "") == "transfer-encoding:chunked" for line in lines[1:]):
        body = _dechunk(body)
    return body.decode("utf-8", "replace")


def _dechunk(body: bytes) -> bytes:
    out = bytearray()
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2:]
    return bytes(out)


class Scraper:
    """Scrapes every target once per round and stores the interval's traffic in ``history``."""

    def __init__(self, view: MeshView, history: History, fetch: Fetch = http_get,
                 concurrency: int = SCRAPE_CONCURRENCY) -> None:
        self.view = view
        self.history = history
        self.fetch = fetch
        self._slots = asyncio.Semaphore(concurrency)
        self._last: dict[str, Counters] = {}
        self._last_time: float | None = None
        self.errors: dict[str, str] = {}
        """Why each target failed its last scrape (shown nowhere but logged once; for tests and debugging)."""
        self.source = "proxies"
        """Where the last round's numbers came from: ``proxies`` (scraped directly) or ``prometheus``."""

    async def _one(self, target: Target) -> Counters | None:
        async with self._slots:
            try:
                text = await self.fetch(target.url)
            except (OSError, TimeoutError, ValueError) as exc:
                if target.id not in self.errors:
                    log.info("dashboard: cannot scrape %s (%s): %s", target.id, target.url, exc)
                self.errors[target.id] = f"{type(exc).__name__}: {exc}"
                return None
        self.errors.pop(target.id, None)
        return parse(text)

    async def _from_proxies(self) -> dict[str, Counters | None]:
        targets = self.view.targets()
        results = await asyncio.gather(*(self._one(t) for t in targets))
        return {t.id: counters for t, counters in zip(targets, results, strict=True)}

    async def _from_prometheus(self, address: str) -> dict[str, Counters | None] | None:
        """The latest value of every Istio series Prometheus scraped, per scrape target; None if it fails."""
        query = "{__name__=~\"" + "|".join(sorted(WANTED)) + "\"}"
        url = f"http://{address}/api/v1/query?query={quote(query)}"
        try:
            answer = json.loads(await self.fetch(url))
            rows = answer["data"]["result"]
            by_target: dict[str, list[tuple[str, dict[str, str], float]]] = {}
            for row in rows:
                labels = row["metric"]
                by_target.setdefault(f"prometheus:{labels.get('instance', '')}", []).append(
                    (labels.get("__name__", ""), labels, float(row["value"][1])))
        except (OSError, TimeoutError, ValueError, KeyError, TypeError, IndexError) as exc:
            if "prometheus" not in self.errors:
                log.info("dashboard: cannot query Prometheus at %s (%s); scraping the proxies", address, exc)
            self.errors["prometheus"] = f"{type(exc).__name__}: {exc}"
            return None
        self.errors.pop("prometheus", None)
        return {target: counters_of(found) for target, found in by_target.items()}

    async def round(self, now: float | None = None) -> None:
        """One scrape of every target (or one query of the mesh's Prometheus, when it runs); from the second
        round on, adds an interval to the history."""
        address = self.view.prometheus()
        collected = await self._from_prometheus(address) if address else None
        self.source = "prometheus" if collected is not None else "proxies"
        if collected is None:
            collected = await self._from_proxies()
        now = time.time() if now is None else now
        deltas = []
        current: dict[str, Counters] = {}
        for target_id, counters in collected.items():
            if counters is None:
                continue  # re-based when it answers again: its gap must not look like a burst
            current[target_id] = counters
            previous = self._last.get(target_id)
            if previous is not None:
                deltas.append(delta(previous, counters))
        self._last = current  # proxies that vanished are forgotten here
        if self._last_time is not None and now > self._last_time:
            self.history.add(Point(now, now - self._last_time, interval_of(deltas)))
        self._last_time = now

    async def run(self, interval: float = SCRAPE_INTERVAL) -> None:
        """Scrape forever, one round per ``interval`` (a slow round delays the next one, never overlaps)."""
        while True:
            started = time.monotonic()
            try:
                await self.round()
            except Exception:
                log.exception("dashboard scrape round failed")
            await asyncio.sleep(max(0.1, interval - (time.monotonic() - started)))


def static_dir() -> Path:
    """Where the built front end lives (package data of ``kizuna.dashboard``)."""
    return Path(str(resources.files("kizuna.dashboard"))) / "static"


class Dashboard:
    """The dashboard's HTTP listener and scrape task."""

    def __init__(self, view: MeshView, fetch: Fetch = http_get, interval: float = SCRAPE_INTERVAL,
                 history_seconds: float = HISTORY_SECONDS, static: Path | None = None) -> None:
        self.view = view
        self.interval = interval
        self.history = History(max(2, int(history_seconds / interval)))
        self.scraper = Scraper(view, self.history, fetch)
        self.static = static or static_dir()
        self._http = HttpServer(self.handle)
        self._task: asyncio.Task[None] | None = None

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Listen (plain HTTP) and start scraping; returns the bound address."""
        bound = await self._http.start(host, port)
        self._task = asyncio.create_task(self.scraper.run(self.interval), name="dashboard-scrape")
        return bound

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._http.close()

    async def handle(self, request: Request) -> Response:
        if request.method not in ("GET", "HEAD"):
            return error_response(405, "the dashboard is read-only")
        path = request.path
        if path == "/api/graph":
            view = graph(self.history, self.view.topology(), time.time(), _window(request.param("window")))
            return json_response(200, {**view, "source": self.scraper.source})
        if path.startswith("/api/services/"):
            parts = [unquote(p) for p in path[len("/api/services/"):].split("/")]
            if len(parts) != 2 or not all(parts):
                return error_response(404, "use /api/services/<namespace>/<name>")
            return json_response(200, self.service(parts[0], parts[1], _window(request.param("window"))))
        if path == "/api/proxies":
            return json_response(200, {"proxies": self.view.proxy_status()})
        if path == "/api/traces":
            limit = request.param("limit") or "50"
            return json_response(200, {"traces": self.view.traces(min(int(limit), 500) if limit.isdigit() else 50)})
        if path.startswith("/api/traces/"):
            trace_id = unquote(path[len("/api/traces/"):])
            spans = self.view.trace(trace_id)
            if spans is None:
                return error_response(404, f"no trace {trace_id} (only the most recent traces are kept)")
            return json_response(200, {"traceId": trace_id.lower(), "spans": spans})
        if path.startswith("/api/"):
            return error_response(404, f"no such endpoint: {path}")
        return self._file(path)

    def service(self, namespace: str, name: str, window: float = 60.0) -> dict[str, Any]:
        """Everything the service page shows about ``name.namespace``."""
        info = ServiceInfo(namespace, name)
        topology = self.view.topology()
        known = next((s for s in topology.services if s.namespace == namespace and s.name == name), None)
        workloads = known.workloads if known else ()
        now = time.time()
        current = graph(self.history, topology, now, window)
        ids = {w.id for w in workloads}
        inbound = [e for e in current["edges"] if e["service"] == info.fqdn]
        outbound = [e for e in current["edges"] if e["source"] in ids]
        rules = rules_for(info.fqdn, self.view.resources("VirtualService")
                          + self.view.resources("DestinationRule"))
        proxies = [p for p in self.view.proxy_status()
                   if (p.get("namespace"), p.get("workload")) in {(w.namespace, w.name) for w in workloads}]
        return {"namespace": namespace, "name": name, "fqdn": info.fqdn, "exists": known is not None,
                "workloads": [{"id": w.id, "app": w.app, "version": w.version} for w in workloads],
                "series": service_series(self.history, info.fqdn), "interval": self.interval,
                "inbound": inbound, "outbound": outbound, "config": _config(rules), "proxies": proxies}

    def _file(self, path: str) -> Response:
        name = "index.html" if path in ("/", "") else path.lstrip("/")
        root = self.static.resolve()
        target = (root / name).resolve()
        if not target.is_relative_to(root) or not target.is_file():
            return error_response(404, f"no such page: {path}")
        kind = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        if kind.startswith("text/") or kind.endswith("javascript"):
            kind += "; charset=utf-8"
        # Built assets have content hashes in their names; index.html must always be fresh.
        cache = "no-cache" if target.name == "index.html" else "public, max-age=31536000, immutable"
        return Response(200, target.read_bytes(), kind, (("Cache-Control", cache),))


def _window(text: str | None) -> float:
    try:
        value = float(text) if text else 60.0
    except ValueError:
        return 60.0
    return min(max(value, 5.0), HISTORY_SECONDS)


def _config(rules: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    from kizuna.api.codec import dump_yaml

    return [{"kind": r.get("kind"), "name": (r.get("metadata") or {}).get("name"),
             "namespace": (r.get("metadata") or {}).get("namespace") or "default", "yaml": dump_yaml(dict(r))}
            for r in rules]


__all__ = ["Dashboard", "ControlPlaneView", "Scraper", "Target", "http_get", "DEFAULT_PORT"]
