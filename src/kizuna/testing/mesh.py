"""Small meshes for tests and benchmarks: snapshots for a client and a server sidecar, and a loop to run them.

``two_hop_snapshots`` is the static two-sidecar config the benchmark uses: client → client sidecar (outbound)
→ server sidecar (inbound) → app. ``BackgroundLoop`` runs sidecars and upstreams in-process on a uvloop
thread and ``LocalMesh`` starts and stops them, so plain synchronous tests drive them with real clients;
``read_replies`` reads pipelined responses off a raw socket.
"""

from __future__ import annotations

import asyncio
import http.client
import random
import socket
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar, cast

import uvloop

from kizuna.proxy.pool import PoolRegistry
from kizuna.proxy.sidecar import Sidecar
from kizuna.proxy.upstream import UpstreamConnection
from kizuna.proxyconfig.bootstrap import Bootstrap, Capture, Node, ReadinessProbe
from kizuna.proxyconfig.model import (
    Cluster,
    Endpoint,
    InboundPort,
    LbPolicy,
    Protocol,
    RetryPolicy,
    Route,
    RouteAction,
    Snapshot,
    VirtualHost,
    WeightedCluster,
    cluster_name,
)
from kizuna.testing.upstream import TcpEchoServer, UpstreamServer

T = TypeVar("T")
DEFAULT_RETRY = RetryPolicy()


def service_hosts(service: str, namespace: str = "default") -> tuple[str, ...]:
    """Every name a service answers to inside the mesh, short to fully qualified."""
    return (service, f"{service}.{namespace}", f"{service}.{namespace}.svc",
            f"{service}.{namespace}.svc.cluster.local")


def service_cluster(service: str, port: int, endpoints: list[tuple[str, int]], subset: str = "",
                    lb_policy: LbPolicy = "LEAST_REQUEST", protocol: Protocol = "http",
                    namespace: str = "default", connect_timeout: float = 10.0) -> Cluster:
    """The outbound cluster of ``service:port`` (one subset) with its endpoints."""
    fqdn = f"{service}.{namespace}.svc.cluster.local"
    return Cluster(cluster_name("outbound", port, subset, fqdn), fqdn, port, subset, protocol, lb_policy,
                   tuple(Endpoint(a, p, workload=f"{service}-{i}") for i, (a, p) in enumerate(endpoints)),
                   connect_timeout)


def simple_virtual_host(service: str, port: int, clusters: list[tuple[str, int]] | str,
                        timeout: float | None = None, retry: RetryPolicy = DEFAULT_RETRY,
                        protocol: Protocol = "http", namespace: str = "default") -> VirtualHost:
    """A virtual host with one catch-all route to ``clusters`` (a name, or (name, weight) pairs)."""
    weighted = ([WeightedCluster(clusters, 100)] if isinstance(clusters, str)
                else [WeightedCluster(name, weight) for name, weight in clusters])
    fqdn = f"{service}.{namespace}.svc.cluster.local"
    return VirtualHost(f"{fqdn}:{port}", service_hosts(service, namespace), port, protocol,
                       (Route("default", (), RouteAction(tuple(weighted), timeout, retry)),))


def two_hop_snapshots(client_mesh_addr: str, server_mesh_addr: str, app_addr: str, app_port: int,
                      service: str = "bench", port: int = 80,
                      inbound_protocol: Protocol = "http") -> tuple[Snapshot, Snapshot]:
    """Snapshots for a client sidecar (outbound ``service:port`` → the server sidecar) and a server sidecar
    (inbound ``app_port`` on its mesh address → the app at ``app_addr:app_port``).

    ``client_mesh_addr`` is not referenced by the client's own snapshot (its listeners come from its
    bootstrap); it is taken so callers describe the whole topology in one place.
    """
    del client_mesh_addr
    cluster = service_cluster(service, port, [(server_mesh_addr, app_port)])
    client = Snapshot("two-hop-client", virtual_hosts=(simple_virtual_host(service, port, cluster.name),),
                      clusters=(cluster,))
    inbound = InboundPort(app_port, app_addr, app_port, inbound_protocol)
    server = Snapshot("two-hop-server", inbound=(inbound,))
    return client, server


def transparent_snapshots(client_pod: str, server_pod: str, services: list[tuple[str, int, str, int, Protocol]]
                          ) -> tuple[Snapshot, Snapshot]:
    """Snapshots for iptables capture, where every pod has one address (its pod IP) and services have VIPs.

    ``services`` are ``(name, port, vip, target_port, protocol)``, each served by the app of the server pod
    at ``server_pod:target_port``. Both sidecars get every service's virtual host (so the server's app can
    call its own services too); the server's snapshot adds an inbound port per target port.
    ``client_pod`` is not referenced by the snapshots (taken so callers describe the topology in one place).
    """
    del client_pod
    clusters = tuple(service_cluster(name, port, [(server_pod, target)], protocol=protocol)
                     for name, port, _, target, protocol in services)
    hosts = tuple(VirtualHost(vh.name, vh.hosts, vh.port, vh.protocol, vh.routes, (vip,))
                  for (name, port, vip, _, protocol), cluster in zip(services, clusters, strict=True)
                  for vh in [simple_virtual_host(name, port, cluster.name, protocol=protocol)])
    inbound = tuple(InboundPort(target, server_pod, target, "auto" if protocol == "http" else protocol)
                    for _, _, _, target, protocol in services)
    return (Snapshot("transparent-client", virtual_hosts=hosts, clusters=clusters),
            Snapshot("transparent-server", inbound=inbound, virtual_hosts=hosts, clusters=clusters))


def sidecar_bootstrap(node_id: str, mesh_address: str, pod_address: str = "127.0.0.1",
                      static_snapshot: str | None = None, admin_port: int = 15000,
                      outbound_port: int = 15001, readiness: ReadinessProbe | None = None,
                      capture: Capture = "proxy") -> Bootstrap:
    """A bootstrap for a sidecar with no control plane; without ``readiness`` the app counts as ready.
    With ``capture="iptables"`` pass the pod IP as both addresses (one address per pod)."""
    return Bootstrap(Node(node_id, node_id.split(".")[0], pod_address=pod_address, mesh_address=mesh_address),
                     static_snapshot=static_snapshot, admin_port=admin_port, outbound_port=outbound_port,
                     readiness=readiness, capture=capture)


_used: set[str] = set()


def loopback_addresses(count: int, prefix: str = "127.20") -> list[str]:
    """``count`` distinct addresses in ``prefix``.0.0/16 not handed out before by this process (random, so
    concurrent test runs rarely collide)."""
    found: list[str] = []
    while len(found) < count:
        address = f"{prefix}.{random.randint(1, 254)}.{random.randint(1, 254)}"
        if address not in _used:
            _used.add(address)
            found.append(address)
    return found


class BackgroundLoop:
    """A uvloop event loop running in a daemon thread; synchronous code submits coroutines to it."""

    def __init__(self) -> None:
        self.loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="kizuna-test-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        """Run ``coro`` on the loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        """Cancel what still runs, stop the loop and its thread."""

        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.run(cancel_all())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


async def _call(fn: Callable[..., T], *args: Any) -> T:
    return fn(*args)


class LocalMesh:
    """Sidecars and upstreams started in-process on a ``BackgroundLoop``; ``close`` stops all of them."""

    def __init__(self, loop: BackgroundLoop) -> None:
        self.loop = loop
        self.sidecars: list[Sidecar] = []
        self.servers: list[UpstreamServer | TcpEchoServer] = []
        self.captures: list[tuple[asyncio.Server, PoolRegistry[UpstreamConnection]]] = []

    def upstream(self, address: str, port: int = 0, **options: Any) -> UpstreamServer:
        """A programmable HTTP app on ``address:port`` (see ``UpstreamServer`` for the options)."""
        server = self.loop.run(UpstreamServer(address, port, **options).start())
        self.servers.append(server)
        return server

    def echo(self, address: str, port: int = 0, greeting: bytes = b"") -> TcpEchoServer:
        """A TCP echo app, server-first when ``greeting`` is set."""
        server = self.loop.run(TcpEchoServer(address, port, greeting=greeting).start())
        self.servers.append(server)
        return server

    def sidecar(self, mesh_address: str, snapshot: Snapshot | None = None, **options: Any) -> Sidecar:
        """A started sidecar listening on ``mesh_address`` (see ``sidecar_bootstrap`` for the options)."""
        sidecar = Sidecar(sidecar_bootstrap(f"sidecar-{mesh_address}.default", mesh_address, **options))
        self.loop.run(sidecar.start())
        self.sidecars.append(sidecar)
        if snapshot is not None:
            self.apply(sidecar, snapshot)
        return sidecar

    def apply(self, sidecar: Sidecar, snapshot: Snapshot) -> None:
        """``sidecar.apply`` on the loop's thread; its ValueError comes back here."""
        self.loop.run(_call(sidecar.apply, snapshot))

    def captured(self, snapshot: Snapshot, dst: tuple[str, int], address: str | None = None) -> tuple[str, int]:
        """A listener serving every connection as the outbound capture port serves one redirected from
        ``dst`` (what ``SO_ORIGINAL_DST`` reports behind iptables; no network namespace needed), with
        ``snapshot`` in force; its address."""
        from kizuna.proxy.capture import OutboundCapture, OwnPorts
        from kizuna.proxy.listener import ConnectionInfo
        from kizuna.proxy.outbound import OutboundDispatcher
        from kizuna.proxy.passthrough import Passthrough
        from kizuna.proxy.state import ProxyState
        from kizuna.proxy.stats import Stats

        loop = self.loop.loop
        stats = Stats()
        pools: PoolRegistry[UpstreamConnection] = PoolRegistry()

        class Source:
            state = ProxyState(snapshot, pools, stats)

        capture = OutboundCapture(Source(), OutboundDispatcher(Source(), stats, loop), Passthrough(pools, stats),
                                  stats, set(), OwnPorts(set(), {15001}))
        if address is None:
            (address,) = loopback_addresses(1)

        async def serve() -> asyncio.Server:
            server = await loop.create_server(lambda: capture(ConnectionInfo("outbound", 15001, dst)), address, 0)
            return cast(asyncio.Server, server)

        server = self.loop.run(serve())
        self.captures.append((server, pools))
        return address, server.sockets[0].getsockname()[1]

    def close(self) -> None:
        for sidecar in self.sidecars:
            self.loop.run(sidecar.stop(drain=0.5))
        for server in self.servers:
            self.loop.run(server.stop())
        for listener, pools in self.captures:
            self.loop.run(_close_capture(listener, pools))
        self.sidecars.clear()
        self.servers.clear()
        self.captures.clear()


async def _close_capture(server: asyncio.Server, pools: PoolRegistry[UpstreamConnection]) -> None:
    server.close()
    pools.close()
    await server.wait_closed()


class Reply:
    """A response read off a socket: status, headers by lower-case name, body."""

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def __repr__(self) -> str:
        return f"Reply({self.status}, {self.headers}, {self.body[:60]!r})"


class _FileSocket:
    """Lets ``http.client.HTTPResponse`` read consecutive responses from one buffered file, which it must
    not close after the first."""

    def __init__(self, file: Any) -> None:
        self.file = file

    def makefile(self, mode: str) -> Any:
        return self

    def close(self) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        return getattr(self.file, name)


def read_replies(sock: socket.socket, count: int, method: str = "GET") -> list[Reply]:
    """Read ``count`` pipelined responses from ``sock`` (bodies framed by length, chunks or close)."""
    replies = []
    with sock.makefile("rb") as file:
        for _ in range(count):
            response = http.client.HTTPResponse(_FileSocket(file), method=method)  # type: ignore[arg-type]
            response.begin()
            body = response.read()
            replies.append(Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, body))
    return replies
