"""``kizuna controlplane``: run the control plane of the mesh in a state dir until SIGTERM or SIGINT.

Start-up order matters to the other processes: the token exists before anything listens, the store is loaded
before the first sidecar can connect, and ``controlplane.json`` is written (atomically) only once the listener
accepts, so a client that finds the file can connect. A clean exit removes the file again.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import uvloop

from kizuna.controlplane.api_tls import server_context
from kizuna.controlplane.ca import DEFAULT_WORKLOAD_TTL, CaError, CertificateAuthority
from kizuna.controlplane.credentials import DEFAULT_TRUST_DOMAIN, CredentialError, check_trust_domain
from kizuna.controlplane.files import ADDRESS_FILE, atomic_write_json, read_address_file
from kizuna.controlplane.push import PushQueue, mesh_generator
from kizuna.controlplane.registry import Registry
from kizuna.controlplane.server import ControlPlaneServer
from kizuna.controlplane.store import STORE_DIR, FileStore, StoreError
from kizuna.controlplane.token import load_or_create_token
from kizuna.controlplane.vips import VipAllocator

log = logging.getLogger("kizuna.controlplane")

REGISTRY_FILE = "registry.json"
"""In the store directory, so ``kizuna up``'s fresh start (which removes that directory) forgets it too."""


def parse_listen(listen: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) into its parts; raises ValueError on anything else."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not host or int(port) > 65535:
        raise ValueError(f"--listen must be host:port, got {listen!r}")
    return host.strip("[]"), int(port)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_address_file(state_dir: Path) -> None:
    data = read_address_file(state_dir)
    if data is not None and data.get("pid") == os.getpid():
        (state_dir / ADDRESS_FILE).unlink(missing_ok=True)


async def serve(state_dir: str | Path, listen: str = "127.0.0.1:0", stop: asyncio.Event | None = None,
                service_cidr: str | None = None, workload_cert_ttl: float | None = None,
                cacerts: str | Path | None = None, tls: bool = False, dashboard: str | None = None,
                trust_domain: str = DEFAULT_TRUST_DOMAIN) -> int:
    """Run the control plane until ``stop`` is set (or SIGTERM/SIGINT); returns the exit status.

    With ``service_cidr``, Services get a clusterIP (VIP) from that range (transparent mode). The certificate
    authority signs workload certificates for ``workload_cert_ttl`` seconds (default 24 h), with the root
    plugged in from ``cacerts`` (Istio's layout) or the state dir's own self-signed one. With ``tls`` the API and
    discovery are served over TLS (``kizuna controlplane`` does; in-process tests may not). With ``dashboard``
    (``host:port``) the dashboard is served there too, in plain HTTP; a busy port only logs a warning.
    ``trust_domain`` names every identity the CA signs and the ones compiled for secure naming and policies."""
    state = Path(state_dir)
    host, port = parse_listen(listen)
    vips = VipAllocator(service_cidr) if service_cidr else None
    state.mkdir(parents=True, exist_ok=True)
    running = read_address_file(state)
    if running is not None and running.get("pid") != os.getpid() and pid_alive(int(running.get("pid", 0))):
        log.error("a control plane is already running for %s (pid %s, %s)", state, running["pid"],
                  running["address"])
        return 1
    token = load_or_create_token(state)
    try:
        store: FileStore[Any] = FileStore(state)
    except StoreError as exc:
        log.error("%s", exc)
        return 1
    registry = Registry(path=state / STORE_DIR / REGISTRY_FILE)
    restored = registry.restore()
    pusher = PushQueue(store, registry, functools.partial(mesh_generator, trust_domain=trust_domain))
    try:
        check_trust_domain(trust_domain)
        ca = CertificateAuthority.load_or_create(state, trust_domain,
                                                 workload_ttl=workload_cert_ttl or DEFAULT_WORKLOAD_TTL,
                                                 plugged=cacerts)
    except (CaError, CredentialError, OSError, ValueError) as exc:
        log.error("certificate authority: %s", exc)
        return 1
    server = ControlPlaneServer(token, store, registry, pusher, vips=vips, ca=ca)
    try:
        context = server_context(ca, state) if tls else None
        server.state_dir = str(state)
        bound_host, bound_port = await server.start(host, port, context)
    except OSError as exc:
        log.error("cannot listen on %s: %s", listen, exc)
        return 1
    address = f"[{bound_host}]:{bound_port}" if ":" in bound_host else f"{bound_host}:{bound_port}"
    board, board_url = await _start_dashboard(dashboard, server, state) if dashboard else (None, None)
    receiver, otlp_url = await _start_receiver(bound_host, server) if tls else (None, None)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    push_task = asyncio.create_task(pusher.run(), name="push-queue")
    try:
        # Readers poll for this file: they must never see it half written.
        atomic_write_json(state / ADDRESS_FILE, {"address": address, "pid": os.getpid(), "tls": tls,
                                                 "dashboard": board_url, "otlp": otlp_url,
                                                 "trustDomain": trust_domain}, durable=False)
        log.info("control plane listening on %s (state %s, %d resources, generation %d, %d instances to "
                 "reconnect)", address, state, len(store.list()), store.generation, restored)
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({push_task, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if push_task.done():
            push_task.result()  # the push loop only ends by failing; surface why
        stopped.cancel()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        push_task.cancel()
        await asyncio.gather(push_task, return_exceptions=True)
        if board is not None:
            await board.close()
        if receiver is not None:
            await receiver.close()
        await server.close()
        registry.close()
        _remove_address_file(state)
    log.info("control plane stopped")
    return 0


async def _start_receiver(host: str, server: ControlPlaneServer) -> tuple[Any, str | None]:
    """The embedded OTLP/HTTP trace receiver on ``host``:4318 (beside the API); a busy port only warns."""
    from kizuna.controlplane.traces import OTLP_PORT, OtlpReceiver

    receiver = OtlpReceiver(server.traces)
    try:
        bound, port = await receiver.start(host, OTLP_PORT)
    except OSError as exc:
        log.warning("trace receiver not started on %s:%d: %s", host, OTLP_PORT, exc)
        return None, None
    return receiver, f"http://{bound}:{port}/v1/traces"


async def _start_dashboard(listen: str, server: ControlPlaneServer, state: Path) -> tuple[Any, str | None]:
    """The dashboard on ``listen``, over the server's store, registry and push queue; (it, its URL) or
    (None, None) when it cannot listen (the mesh works without it)."""
    from kizuna.controlplane.dashboard import ControlPlaneView, Dashboard

    board = Dashboard(ControlPlaneView(server.store, server.registry, server.pusher, state,
                                       server.traces))
    try:
        host, port = await board.start(*parse_listen(listen))
    except (OSError, ValueError) as exc:
        log.warning("dashboard not started on %s: %s", listen, exc)
        await board.close()
        return None, None
    url = f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"
    log.info("dashboard on %s", url)
    return board, url


def run(state_dir: str, listen: str = "127.0.0.1:0", service_cidr: str | None = None,
        workload_cert_ttl: float | None = None, cacerts: str | None = None, tls: bool = False,
        dashboard: str | None = None, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> int:
    """Entry point for ``kizuna controlplane``: blocks until SIGTERM/SIGINT, returns the exit status.

    ``service_cidr`` (``--service-cidr``) turns on clusterIP allocation for Services."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        parse_listen(listen)
        if service_cidr:
            VipAllocator(service_cidr)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(serve(state_dir, listen, service_cidr=service_cidr,
                                workload_cert_ttl=workload_cert_ttl, cacerts=cacerts, tls=tls,
                                dashboard=dashboard, trust_domain=trust_domain))
