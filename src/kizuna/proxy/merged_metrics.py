"""Istio's status port (pilot-agent's 15020): merged metrics and the proxy's readiness.

``GET /stats/prometheus`` answers, in one Prometheus text exposition, what the Prometheus port (15090) serves,
then the app's own metrics (Istio's "metrics merging": ``Bootstrap.app_metrics``, which the runtime takes from
the pod's ``prometheus.io/scrape|port|path`` annotations), then the agent's counters
``istio_agent_scrapes_total`` and ``istio_agent_scrape_failures_total{type="application"}``. The app's part is
fetched afresh for every scrape from its pod address, with a short timeout and a size bound; when that fails
the answer is still 200 with the proxy's metrics, and the failure is counted (as Istio's agent does), so a
broken app endpoint never hides the mesh's metrics.

``GET /healthz/ready`` is the proxy's readiness as Istio's agent reports it: 200 once a config is applied, 503
before. The app's readiness is not part of it (that is the admin port's ``/ready`` and the endpoint's health).

The merge is a pure function (``merge``); ``fetch_app_metrics`` (through the sidecar's small client,
``proxy/http_client.py``) and ``StatusPort`` are the asyncio edge: a scrape every few seconds is not the request
path.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Collection
from typing import Protocol

from kizuna.proxy.admin import PROMETHEUS_PATH, PROMETHEUS_TYPE, http_protocol
from kizuna.proxy.http_client import ResponseError, request
from kizuna.proxyconfig.bootstrap import AppMetrics

READY_PATH = "/healthz/ready"
APP_TIMEOUT = 2.5
"""Seconds the app gets to answer; well inside Prometheus' default 10 s scrape timeout."""
APP_BODY_LIMIT = 8 * 1024 * 1024
"""An app exposition larger than this is refused (a scrape must not hold unbounded memory in the proxy)."""
ACCEPT = b"text/plain;version=0.0.4;q=1,*/*;q=0.1"
"""The classic text format: what the merged answer is written in."""
_FAMILY_SUFFIXES = ("", "_bucket", "_sum", "_count", "_total", "_created", "_info", "_gcount", "_gsum")
"""Sample names that belong to a family ``name`` (histograms, summaries, OpenMetrics counters)."""


# -- the merge (pure) ---------------------------------------------------------------------------------------


def sample_name(line: str) -> str:
    """The metric name of a sample line (``name{labels} value`` or ``name value``)."""
    end = len(line)
    for stop in ("{", " ", "\t"):
        at = line.find(stop)
        if 0 <= at < end:
            end = at
    return line[:end]


def metric_names(text: str) -> set[str]:
    """Every family name (``# HELP``/``# TYPE``) and sample name in an exposition."""
    names = set()
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("#"):
            fields = line.split(None, 3)
            if len(fields) >= 3 and fields[1] in ("HELP", "TYPE"):
                names.add(fields[2])
        else:
            names.add(sample_name(line))
    return names


def app_part(app_text: str, taken: Collection[str]) -> str:
    """The app's exposition as it joins the merged one: its ``# HELP``/``# TYPE`` lines kept, OpenMetrics'
    ``# EOF`` dropped (only the end of a whole answer may carry it), and every family whose name the proxy
    already uses (``taken``) left out, so no metric is described or sampled twice in one answer (a second
    ``# TYPE`` for a name makes strict parsers refuse the whole scrape)."""
    out: list[str] = []
    skipping: str | None = None
    """The app family being left out, while its lines follow."""
    for raw in app_text.splitlines():
        line = raw.strip()
        if not line or line == "# EOF":
            continue
        if line.startswith("#"):
            fields = line.split(None, 3)
            if len(fields) >= 3 and fields[1] in ("HELP", "TYPE", "UNIT"):
                family = fields[2]
                skipping = family if family in taken else None
                if skipping is not None:
                    continue
            out.append(line)
            continue
        name = sample_name(line)
        if name in taken or (skipping is not None and name in {skipping + s for s in _FAMILY_SUFFIXES}):
            continue
        out.append(line)
    return "".join(f"{line}\n" for line in out)


def agent_exposition(scrapes: int, app_failures: int | None) -> str:
    """The agent's own counters (Istio's names); ``app_failures`` None: no app endpoint is merged."""
    lines = ["# HELP istio_agent_scrapes_total The total number of scrape requests.",
             "# TYPE istio_agent_scrapes_total counter",
             f"istio_agent_scrapes_total {scrapes}"]
    if app_failures is not None:
        lines += ["# HELP istio_agent_scrape_failures_total The total number of failed scrapes.",
                  "# TYPE istio_agent_scrape_failures_total counter",
                  f'istio_agent_scrape_failures_total{{type="application"}} {app_failures}']
    return "".join(f"{line}\n" for line in lines)


def merge(proxy_text: str, app_text: str | None, agent_text: str = "") -> str:
    """One exposition: the proxy's metrics, the app's (None: none fetched), the agent's. The proxy's and the
    agent's families win over an app family of the same name."""
    parts = [proxy_text, agent_text]
    if app_text:
        parts.insert(1, app_part(app_text, metric_names(proxy_text) | metric_names(agent_text)))
    return "".join(p if p.endswith("\n") else p + "\n" for p in parts if p)


# -- the asyncio edge ---------------------------------------------------------------------------------------


class AppMetricsError(Exception):
    """The app's metrics could not be fetched; the message says why (counted and logged, never answered)."""


async def fetch_app_metrics(address: str, target: AppMetrics, *, source: str | None = None,
                            timeout: float = APP_TIMEOUT, limit: int = APP_BODY_LIMIT) -> str:
    """GET the app's exposition from ``address:target.port`` + ``target.path``; leaving from ``source`` when
    given (with iptables capture: 127.0.0.6, which the capture rules let through). Raises AppMetricsError."""
    try:
        response = await request(address, target.port, "GET", target.path, timeout=timeout, source=source,
                                 limit=limit, headers=((b"Accept", ACCEPT), (b"User-Agent", b"kizuna-agent")))
    except TimeoutError:
        raise AppMetricsError(f"no answer within {timeout:g}s") from None
    except OSError as exc:
        raise AppMetricsError(exc.strerror or str(exc)) from None
    except ResponseError as exc:
        raise AppMetricsError(str(exc)) from None
    if not 200 <= response.status < 300:
        raise AppMetricsError(f"status {response.status}")
    return response.body.decode("utf-8", errors="replace")


class StatusView(Protocol):
    """What the status port shows of a proxy."""

    @property
    def config_applied(self) -> bool: ...

    def prometheus_text(self) -> str: ...


class StatusPort:
    """One proxy's status port: the responder and its scrape counters."""

    def __init__(self, view: StatusView, app: AppMetrics | None, app_address: str, *, source: str | None = None,
                 timeout: float = APP_TIMEOUT, name: str = "") -> None:
        self.view = view
        self.app = app
        self.app_address = app_address
        self.source = source
        self.timeout = timeout
        self.name = name
        """Who logs (the proxy's node id)."""
        self.scrapes = 0
        self.app_failures = 0
        self.last_app_error: str | None = None
        """Why the last fetch of the app's metrics failed (None: it worked, or none was tried yet)."""

    def protocol(self) -> asyncio.BaseProtocol:
        """A protocol serving one status-port connection."""
        return http_protocol(self.answer)

    async def answer(self, method: str, path: str) -> tuple[int, str, bytes]:
        """Status, content type and body for one request."""
        if path not in (PROMETHEUS_PATH, READY_PATH):
            return 404, "text/plain", b"not found\n"
        if method != "GET":
            return 405, "text/plain", b"method not allowed\n"
        if path == READY_PATH:
            if self.view.config_applied:
                return 200, "text/plain", b"ready\n"
            return 503, "text/plain", b"not ready: no config applied\n"
        self.scrapes += 1
        app_text = await self._app_text()
        text = merge(self.view.prometheus_text(), app_text,
                     agent_exposition(self.scrapes, None if self.app is None else self.app_failures))
        return 200, PROMETHEUS_TYPE, text.encode()

    async def _app_text(self) -> str | None:
        if self.app is None:
            return None
        try:
            text = await fetch_app_metrics(self.app_address, self.app, source=self.source, timeout=self.timeout)
        except AppMetricsError as exc:
            self.app_failures += 1
            if str(exc) != self.last_app_error:  # once per new reason, not once per scrape
                print(f"kizuna proxy {self.name}: app metrics at {self.app_address}:{self.app.port}"
                      f"{self.app.path}: {exc}", file=sys.stderr, flush=True)
            self.last_app_error = str(exc)
            return None
        self.last_app_error = None
        return text
