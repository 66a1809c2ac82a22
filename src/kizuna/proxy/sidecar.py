"""The sidecar: listeners, the current snapshot and what derives from it, the app prober, the admin port.

``apply(snapshot)`` swaps the whole ``ProxyState`` at once; a request keeps the state it started with. Inbound
listeners follow the snapshot's ports; a snapshot whose ports cannot be bound is refused (ValueError) and the
previous one stays. Pools of endpoints that left the config are drained.

With ``bootstrap.capture == "iptables"`` the sidecar listens on ``0.0.0.0`` at the outbound (15001) and
inbound capture (15006) ports instead, and serves each connection by its original destination (``capture``);
the app owns its ports on the pod address, so no per-port inbound listener is opened.

With ``bootstrap.node.kind == "gateway"`` it is an ingress gateway (``gateway``): no app, no capture, no
outbound or inbound listeners; the snapshot's gateway listeners are bound instead, and follow it as inbound
ports do.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kizuna.proxy.admin import admin_protocol
from kizuna.proxy.capture import InboundCapture, OutboundCapture, OwnPorts
from kizuna.proxy.downstream import HttpServerConnection
from kizuna.proxy.h2 import H2Pools, H2ServerConnection
from kizuna.proxy.h2_dispatch import PrefaceSwitch, outbound_router
from kizuna.proxy.health import ReadinessProber
from kizuna.proxy.inbound import InboundHandler
from kizuna.proxy.listener import ConnectionInfo, Listener
from kizuna.proxy.merged_metrics import StatusPort
from kizuna.proxy.outbound import OutboundDispatcher
from kizuna.proxy.passthrough import INBOUND_PASSTHROUGH_SOURCE, CapturePoolRegistry, Passthrough
from kizuna.proxy.pool import PoolRegistry
from kizuna.proxy.state import ProxyState
from kizuna.proxy.stats import Stats
from kizuna.proxy.telemetry import Telemetry, TelemetryStats, stats_exposition
from kizuna.proxy.upstream import UpstreamConnection
from kizuna.proxyconfig.bootstrap import Bootstrap
from kizuna.proxyconfig.model import EMPTY_SNAPSHOT, Snapshot

if TYPE_CHECKING:
    from kizuna.proxy.discovery import DiscoveryClient
    from kizuna.proxy.gateway import GatewayListeners
    from kizuna.proxy.identity import WorkloadIdentity

DRAIN_SECONDS = 5.0
"""On stop, how long requests in flight get to finish."""
WITHDRAW_SECONDS = 1.0
"""On termination, how long the sidecar keeps serving after telling the control plane its endpoint is gone:
time for the push that removes it to reach every other proxy (debounce 0.1 s plus delivery), so none of them
sends a new request here once the listeners close."""


class Sidecar:
    """One sidecar proxy process's worth of state and listeners."""

    def __init__(self, bootstrap: Bootstrap) -> None:
        self.bootstrap = bootstrap
        self.telemetry: Telemetry | None = None
        """Istio's standard metrics and the access log (None: ``bootstrap.telemetry`` is off)."""
        if bootstrap.telemetry:
            from kizuna.proxy.access_log import AccessLog

            log = AccessLog(bootstrap.access_log) if bootstrap.access_log else None
            self.telemetry = Telemetry.from_bootstrap(bootstrap, log)
            if bootstrap.trace_endpoint:
                from kizuna.proxy.tracing import OtlpExporter, Tracer

                node = bootstrap.node
                self.telemetry.tracer = Tracer(f"{node.workload}.{node.namespace}", node.workload,
                                               bootstrap.trace_sampling, OtlpExporter(bootstrap.trace_endpoint))
        self.stats: Stats = TelemetryStats(self.telemetry)
        self.capture = bootstrap.capture == "iptables"
        self.registration_only = bootstrap.capture == "none"
        # With capture, connections to the pod's own address must not be captured again (see passthrough).
        self.pools: PoolRegistry[UpstreamConnection] = (
            CapturePoolRegistry([bootstrap.node.pod_address]) if self.capture else PoolRegistry())
        self.state = ProxyState(EMPTY_SNAPSHOT, self.pools, self.stats)
        self.connections: set[asyncio.BaseProtocol] = set()
        self.discovery: DiscoveryClient | None = None
        self.identity: WorkloadIdentity | None = None
        """The workload certificate, once obtained (see ``_obtain_identity``)."""
        self.h2_pools = H2Pools(self.stats)
        """Outbound HTTP/2 connections (h2c and gRPC streams multiplexed per endpoint)."""
        self._config_applied = False
        self._app_ready = False
        self._health_listener: Callable[[bool], None] | None = None
        self._prober = ReadinessProber(bootstrap.node, bootstrap.readiness, self._on_app_ready,
                                       INBOUND_PASSTHROUGH_SOURCE if self.capture else None)
        self._listeners: dict[int, Listener] = {}
        self._outbound: Listener | None = None
        self._inbound_capture: Listener | None = None
        self._admin: Listener | None = None
        self._prometheus: Listener | None = None
        self._status: Listener | None = None
        """The status port (15020): merged metrics and ``/healthz/ready``."""
        self._inbound_handler: InboundHandler | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._probing: asyncio.Task[Any] | None = None
        self._started = False
        self.gateway: GatewayListeners | None = None
        """A gateway's listeners (None for a sidecar)."""
        if bootstrap.node.kind == "gateway":
            # Imported here: a sidecar never loads gateway code (every sidecar's memory counts).
            from kizuna.proxy.gateway import GatewayListeners

            self.gateway = GatewayListeners(bootstrap, self, self.stats, self.connections)

    # -- what the discovery client and admin read ---------------------------------------------------------

    @property
    def version(self) -> str:
        """The version of the snapshot in use ("" before any)."""
        return self.state.snapshot.version

    @property
    def config_applied(self) -> bool:
        """True once a snapshot was applied."""
        return self._config_applied

    @property
    def app_ready(self) -> bool:
        """The app's readiness as last probed."""
        return self._app_ready

    @property
    def ready(self) -> bool:
        """Ready to serve: a config is applied and the app is ready."""
        return self._config_applied and self._app_ready

    @property
    def control_plane_connected(self) -> bool:
        return self.discovery is not None and bool(self.discovery.connected)

    def set_health_listener(self, callback: Callable[[bool], None]) -> None:
        """``callback(ready)`` is called on every change of the app's readiness."""
        self._health_listener = callback

    def not_ready_reason(self) -> str:
        if not self._config_applied:
            return "no config applied"
        return "app not ready" if not self._app_ready else ""

    def stats_json(self) -> dict[str, Any]:
        data = self.stats.to_json()
        data.update(version=self.version, config_applied=self._config_applied, app_ready=self._app_ready,
                    control_plane_connected=self.control_plane_connected)
        return data

    def prometheus_text(self) -> str:
        """Istio's metrics and kizuna's counters in Prometheus text format (``/stats/prometheus``)."""
        own = stats_exposition(self.stats)
        return own if self.telemetry is None else self.telemetry.exposition() + own

    def config_json(self) -> dict[str, Any]:
        out = {"version": self.version, "snapshot": self.state.snapshot.to_json()}
        if self.identity is not None:
            out["identity"] = self.identity.to_json()
        return out

    # -- configuration ------------------------------------------------------------------------------------

    def apply(self, snapshot: Snapshot) -> None:
        """Use ``snapshot`` from now on. Raises ValueError (the previous one stays) when it cannot be used."""
        try:
            state = ProxyState(snapshot, self.pools, self.stats)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"unusable snapshot {snapshot.version!r}: {exc}") from exc
        ports = {p.port for p in snapshot.inbound}
        own = {self.bootstrap.admin_port, self.bootstrap.outbound_port}
        if self.capture:
            own.add(self.bootstrap.inbound_capture_port)
        taken = ports & own
        if taken:
            raise ValueError(f"inbound port {min(taken)} is one of the sidecar's own ports")
        if self.capture or self.registration_only or self.gateway is not None:
            ports = set()  # every inbound connection comes through the capture port, or there is no sidecar
        gateway_opened = self.gateway.prepare(snapshot) if self.gateway is not None else {}
        opened: dict[int, Listener] = {}
        for port in sorted(ports - self._listeners.keys()):
            try:
                opened[port] = Listener("inbound", self.bootstrap.node.mesh_address, port,
                                        self._accept_inbound)
            except OSError as exc:
                for listener in (*opened.values(), *gateway_opened.values()):
                    listener.close()
                raise ValueError(f"cannot listen on inbound port {port}: {exc.strerror or exc}") from exc
        self.state = state
        self._config_applied = True
        if self.telemetry is not None:
            self.telemetry.index(snapshot)
        for port in self._listeners.keys() - ports:
            self._listeners.pop(port).close()
        self._listeners.update(opened)
        starting = list(opened.values())
        if self.gateway is not None:
            starting += self.gateway.commit(snapshot, gateway_opened, self._started)
        if self._started:
            for listener in starting:
                self._spawn(listener.start())
        self.pools.retain(state.endpoints())
        self._fetch_key_sets(snapshot)

    def _fetch_key_sets(self, snapshot: Snapshot) -> None:
        """Start fetching a RequestAuthentication's remote key sets when it arrives, not at its first request:
        the first tokens need not wait, and a failing ``jwksUri`` shows in ``/stats`` (and ``kizuna status``)
        before any request."""
        security = snapshot.security
        if security is None or not any(r.jwks_uri and not r.jwks for r in security.jwt_rules):
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # applied before the loop runs (tests): the first request starts the fetch
        for guard in (self._inbound_handler.guard if self._inbound_handler is not None else None,
                      self.gateway.guard if self.gateway is not None else None):
            if guard is not None:
                guard.compiled(security)

    # -- lifecycle ----------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen, load the static snapshot if any, start probing the app and the discovery client."""
        loop = asyncio.get_running_loop()
        node = self.bootstrap.node
        outbound = OutboundDispatcher(self, self.stats, loop)
        outbound.h2_pools = self.h2_pools
        if self.gateway is not None:
            self.gateway.outbound = outbound  # gateway listeners come with snapshots
        elif self.capture:
            self._listen_captured(outbound, loop)
        elif self.registration_only:
            pass  # no traffic passes here: admin, probing and discovery only
        else:
            self._inbound_handler = InboundHandler(self, self.stats, self.connections, loop)
            route_h2 = outbound_router(self, outbound)

            def serve_outbound() -> PrefaceSwitch:
                # HTTP/1.x (absolute-form requests, CONNECT) or, opening with the h2 preface, h2c/gRPC.
                return PrefaceSwitch(lambda: HttpServerConnection(outbound, self.stats, self.connections),
                                     lambda: H2ServerConnection(route_h2, self.h2_pools, self.stats,
                                                                self.connections))

            outbound.serve_tunnel = serve_outbound  # a CONNECT to an HTTP port is served alike: see tunnel_http
            self._outbound = Listener("outbound", node.mesh_address, self.bootstrap.outbound_port,
                                      lambda info: serve_outbound())
        # With capture the pod has one address; the admin port is excluded from the capture rules there.
        admin_address = node.pod_address if self.capture else node.mesh_address
        self._admin = Listener("admin", admin_address, self.bootstrap.admin_port,
                               lambda info: admin_protocol(self))
        self._listen_prometheus(admin_address)
        if self.telemetry is not None and self.telemetry.access_log is not None:
            self.telemetry.access_log.start(loop)
        if self.bootstrap.static_snapshot:
            text = Path(self.bootstrap.static_snapshot).read_text()
            self.apply(Snapshot.from_json(json.loads(text)))
        self._started = True
        gateway = list(self.gateway.listeners.values()) if self.gateway is not None else []
        for listener in (self._outbound, self._inbound_capture, self._admin, self._prometheus, self._status,
                         *self._listeners.values(), *gateway):
            if listener is not None:
                await listener.start()
        self._probing = self._spawn(self._prober.run())
        if self.bootstrap.control_plane:
            # Imported here: the discovery client is optional and the proxy must start without it.
            from kizuna.proxy.discovery import DiscoveryClient

            self.discovery = DiscoveryClient(self.bootstrap, self)
            self._spawn(self.discovery.run())
            if self.bootstrap.credential and not self.registration_only and not self.bootstrap.cert_dir:
                self._spawn(self._obtain_identity(self.discovery))
        if self.bootstrap.cert_dir and not self.registration_only:
            from kizuna.proxy.identity import WorkloadIdentity

            self._use_identity(WorkloadIdentity.from_files(self.bootstrap.cert_dir, node.namespace,
                                                           node.service_account, self.bootstrap.trust_domain))

    def _use_identity(self, identity: WorkloadIdentity) -> None:
        """mTLS from now on: inbound by PeerAuthentication, outbound to endpoints that have an identity."""
        self.identity = identity
        self.pools.tls = identity
        for pool in self.pools.pools.values():
            pool.tls = identity
        if self._inbound_handler is not None:
            self._inbound_handler.identity = identity

    async def _obtain_identity(self, discovery: DiscoveryClient) -> None:
        """Get a workload certificate, then mTLS: inbound by PeerAuthentication, outbound to endpoints that
        have an identity. Until the first certificate comes, traffic flows as plaintext (PERMISSIVE)."""
        from kizuna.proxy.identity import WorkloadIdentity

        node = self.bootstrap.node
        identity = WorkloadIdentity(discovery.address, discovery.token, node.namespace, node.service_account,
                                    self.bootstrap.credential, trust_domain=self.bootstrap.trust_domain,
                                    control_plane_tls=discovery.control_plane_tls)
        self.identity = identity
        try:
            await identity.start()
            self._use_identity(identity)
            await asyncio.Event().wait()  # keep the renewals running until stop cancels this task
        finally:
            identity.close()

    async def terminate(self, withdraw: float = WITHDRAW_SECONDS, drain: float = DRAIN_SECONDS) -> None:
        """Leave the mesh without failing a request (Istio users' complaint about rollouts): report the app
        not ready so the control plane removes this endpoint from every other proxy, keep serving while that
        push travels, then stop listening and drain what is in flight."""
        if self._probing is not None:
            self._probing.cancel()
        if self.control_plane_connected and self._app_ready and self.gateway is None:
            # (A gateway is no endpoint of anything: there is nothing to withdraw, it only drains.)
            self._on_app_ready(False)
            await asyncio.sleep(withdraw)
        await self.stop(drain)

    async def stop(self, drain: float = DRAIN_SECONDS) -> None:
        """Stop listening, let requests in flight finish for up to ``drain`` seconds, close everything."""
        for listener in (self._outbound, self._inbound_capture, self._admin, self._prometheus, self._status,
                         *self._listeners.values()):
            if listener is not None:
                listener.close()
        self._listeners.clear()
        if self.gateway is not None:
            self.gateway.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._close_idle()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + drain
        while self._busy() and loop.time() < deadline:
            await asyncio.sleep(0.02)
            self._close_idle()
        for conn in list(self.connections):
            transport = getattr(conn, "transport", None)
            if transport is not None:
                transport.abort()
        self.pools.close()
        self.h2_pools.close()
        if self.telemetry is not None and self.telemetry.access_log is not None:
            self.telemetry.access_log.close()
        if self._inbound_handler is not None:
            self._inbound_handler.h2_pools.close()
            self._inbound_handler.guard.close()
        await asyncio.sleep(0)

    def _listen_captured(self, outbound: OutboundDispatcher, loop: asyncio.AbstractEventLoop) -> None:
        """The two capture listeners on every address of the pod (REDIRECT keeps the original address)."""
        bootstrap = self.bootstrap
        own = OwnPorts({bootstrap.node.pod_address, bootstrap.node.mesh_address},
                       {bootstrap.outbound_port, bootstrap.inbound_capture_port, bootstrap.admin_port,
                        bootstrap.prometheus_port, bootstrap.status_port})
        self._inbound_handler = InboundHandler(self, self.stats, self.connections, loop,
                                               bind=INBOUND_PASSTHROUGH_SOURCE)
        capture_out = OutboundCapture(self, outbound, Passthrough(self.pools, self.stats), self.stats,
                                      self.connections, own, self.h2_pools)
        self._outbound = Listener("outbound", "0.0.0.0", bootstrap.outbound_port, capture_out, capture=True)
        try:
            self._inbound_capture = Listener("inbound", "0.0.0.0", bootstrap.inbound_capture_port,
                                             InboundCapture(self._inbound_handler, own), capture=True)
        except OSError:
            self._outbound.close()
            raise

    def _listen_prometheus(self, address: str) -> None:
        """Istio's Prometheus port (15090: ``/stats/prometheus`` only) and the agent's status port (15020:
        merged metrics, ``/healthz/ready``) on the admin address. With an ephemeral admin port (tests) they are
        ephemeral too; a port already taken is reported, not fatal."""
        bootstrap = self.bootstrap
        if bootstrap.prometheus_port:
            self._prometheus = self._listen_admin_port(
                "Prometheus", address, bootstrap.prometheus_port,
                lambda info: admin_protocol(self, metrics_only=True))
        if bootstrap.status_port:
            status = StatusPort(self, bootstrap.app_metrics, bootstrap.node.pod_address,
                                source=INBOUND_PASSTHROUGH_SOURCE if self.capture else None, name=bootstrap.node.id)
            self._status = self._listen_admin_port("status", address, bootstrap.status_port,
                                                   lambda info: status.protocol())

    def _listen_admin_port(self, what: str, address: str, port: int,
                           handler: Callable[[ConnectionInfo], asyncio.BaseProtocol]) -> Listener | None:
        port = port if self.bootstrap.admin_port else 0
        try:
            return Listener("admin", address, port, handler)
        except OSError as exc:
            print(f"kizuna proxy {self.bootstrap.node.id}: no {what} port {address}:{port}: "
                  f"{exc.strerror or exc}", file=sys.stderr, flush=True)
            return None

    @property
    def prometheus_address(self) -> tuple[str, int] | None:
        """Where ``/stats/prometheus`` is served besides the admin port (None: nowhere else)."""
        return (self._prometheus.address, self._prometheus.port) if self._prometheus is not None else None

    @property
    def status_address(self) -> tuple[str, int] | None:
        """Where the status port (merged metrics, ``/healthz/ready``) is served (None: nowhere)."""
        return (self._status.address, self._status.port) if self._status is not None else None

    def _busy(self) -> bool:
        return any((isinstance(c, HttpServerConnection) and c.exchange is not None)
                   or (isinstance(c, H2ServerConnection) and c.calls) for c in self.connections)

    def _close_idle(self) -> None:
        """Close client connections with no request in flight; the others close after their response."""
        for conn in list(self.connections):
            if isinstance(conn, HttpServerConnection):
                conn.closing = True
                if conn.exchange is None:
                    conn.transport.close()
            elif isinstance(conn, H2ServerConnection):
                conn.drain()  # GOAWAY: streams in flight finish, then it closes

    def _accept_inbound(self, info: ConnectionInfo) -> asyncio.BaseProtocol:
        assert self._inbound_handler is not None
        return self._inbound_handler(info)

    def _on_app_ready(self, ready: bool) -> None:
        self._app_ready = ready
        if self._health_listener is not None:
            self._health_listener(ready)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task
