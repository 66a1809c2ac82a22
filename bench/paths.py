"""The three request paths under test, each started from nothing and checked end to end before measuring.

::

    direct   client ──────────────────────────────────────────────────────────────► origin
    kizuna   client ─► kizuna client sidecar (outbound) ─► kizuna server sidecar (inbound) ─► origin
    haproxy  client ─► haproxy hop (:15001) ──────────► haproxy hop (:80) ────────────► origin

The origin is one HAProxy process (``haproxy-origin.cfg.tmpl``) answering every request with the same 1 KB
body; all paths share it. Every process binds its own address in the ``net`` /24 of 127.50.0.0/16.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from string import Template

from bench.paced import EXPECTED_BODY, probe, request_bytes
from bench.procs import Processes, Started, log_tail, wait_for_port

HERE = Path(__file__).parent
HAPROXY = "/usr/sbin/haproxy"
TARGET = "http://bench:80/"
HOST_HEADER = "bench"
SERVICE = "bench"
SERVICE_PORT = 80
START_TIMEOUT = 30.0


@dataclass(frozen=True, slots=True)
class Layout:
    """Who binds where: one loopback address per process, so listeners never collide."""

    net: str

    @property
    def origin(self) -> tuple[str, int]:
        return f"{self.net}.10", 8080

    @property
    def kizuna_client_mesh(self) -> str:
        return f"{self.net}.21"

    @property
    def kizuna_client_pod(self) -> str:
        return f"{self.net}.11"

    @property
    def kizuna_server_mesh(self) -> str:
        return f"{self.net}.22"

    @property
    def origin_h2(self) -> tuple[str, int]:
        """The h2c origin (HAProxy ``proto h2``) of the h2 paths: same address, its own port."""
        return f"{self.net}.10", 8082

    @property
    def kizuna_h2_addresses(self) -> tuple[str, str, str]:
        """The h2 path's sidecars: ``(client mesh, client pod, server mesh)``."""
        return f"{self.net}.41", f"{self.net}.13", f"{self.net}.42"

    @property
    def haproxy_client(self) -> tuple[str, int]:
        return f"{self.net}.31", 15001

    @property
    def haproxy_server(self) -> tuple[str, int]:
        return f"{self.net}.32", SERVICE_PORT


@dataclass
class PathUnderTest:
    """A started path: where the client connects and the proxy processes on the way (client side first)."""

    name: str
    entry: tuple[str, int]
    proxies: list[Started] = field(default_factory=list)
    notes: str = ""
    netns: str | None = None
    """The network namespace the load tools run in (the transparent path), None for the host."""
    origin: Started | None = None
    """The path's own origin, when it cannot use the shared one (the transparent path's is in a namespace)."""
    load: str = "http1"
    """Which load tools measure it: "http1" (bench.paced + wrk) or "h2" (h2load, see ``bench.h2``)."""


def render_haproxy(template: str, out: Path, **values: str) -> Path:
    """Fill one of the ``haproxy-*.cfg.tmpl`` files and write the config to ``out``."""
    out.write_text(Template((HERE / template).read_text()).substitute(values))
    return out


def wait_until_serving(entry: tuple[str, int], what: str, procs: list[Started],
                       timeout: float = START_TIMEOUT) -> None:
    """Send the benchmark request through ``entry`` until it comes back 200 with the 1 KB body."""
    request = request_bytes(TARGET, HOST_HEADER)
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        for p in procs:
            if not p.alive():
                raise RuntimeError(f"{p.name} exited ({p.popen.returncode}) while starting {what}:\n"
                                   f"{log_tail(p)}")
        try:
            status, body = probe(*entry, request)
            if status == 200 and body == EXPECTED_BODY:
                return
            last = f"status {status}, {body} body bytes"
        except OSError as exc:
            last = repr(exc)
        time.sleep(0.1)
    logs = "\n".join(f"--- {p.name}\n{log_tail(p)}" for p in procs)
    raise TimeoutError(f"{what} did not serve the benchmark request in {timeout:.0f}s ({last})\n{logs}")


def start_origin(procs: Processes, layout: Layout, workdir: Path, cpus: frozenset[int] | None) -> Started:
    """The shared origin: HAProxy answering ``200`` with exactly 1024 bytes, keep-alive."""
    body = workdir / "body-1k.txt"
    body.write_bytes(b"kizuna-bench-1k\n" + b"x" * (EXPECTED_BODY - 17) + b"\n")
    addr, port = layout.origin
    cfg = render_haproxy("haproxy-origin.cfg.tmpl", workdir / "haproxy-origin.cfg", bind=f"{addr}:{port}",
                         body_file=str(body))
    origin = procs.start("origin-haproxy", [HAPROXY, "-db", "-f", str(cfg)], cpus)
    wait_for_port(addr, port, START_TIMEOUT, origin)
    wait_until_serving(layout.origin, "the origin", [origin])
    return origin


def start_direct(procs: Processes, layout: Layout, workdir: Path,
                 cpus: frozenset[int] | None) -> PathUnderTest:
    """No proxy: the client talks to the origin (which accepts the absolute-form request target)."""
    return PathUnderTest("direct", layout.origin, notes="client -> origin")


def start_haproxy(procs: Processes, layout: Layout, workdir: Path,
                  cpus: frozenset[int] | None) -> PathUnderTest:
    """Two HAProxy processes (one thread each, HTTP mode, keep-alive both sides) in front of the origin."""
    c_addr, c_port = layout.haproxy_client
    s_addr, s_port = layout.haproxy_server
    o_addr, o_port = layout.origin
    server_cfg = render_haproxy("haproxy-hop.cfg.tmpl", workdir / "haproxy-server-hop.cfg",
                                bind=f"{s_addr}:{s_port}", server=f"{o_addr}:{o_port}")
    client_cfg = render_haproxy("haproxy-hop.cfg.tmpl", workdir / "haproxy-client-hop.cfg",
                                bind=f"{c_addr}:{c_port}", server=f"{s_addr}:{s_port}")
    server = procs.start("haproxy-server-hop", [HAPROXY, "-db", "-f", str(server_cfg)], cpus)
    client = procs.start("haproxy-client-hop", [HAPROXY, "-db", "-f", str(client_cfg)], cpus)
    wait_for_port(s_addr, s_port, START_TIMEOUT, server)
    wait_for_port(c_addr, c_port, START_TIMEOUT, client)
    wait_until_serving(layout.haproxy_client, "the haproxy path", [client, server])
    return PathUnderTest("haproxy", layout.haproxy_client, [client, server],
                         notes="client -> haproxy (:15001) -> haproxy (:80) -> origin")


def kizuna_unavailable() -> str | None:
    """Why the kizuna path cannot run yet (proxy or test kit not written), or None when it can."""
    missing = []
    for module in ("kizuna.proxy.main", "kizuna.testing.mesh"):
        try:
            found = importlib.util.find_spec(module) is not None
        except ImportError:
            found = False
        if not found:
            missing.append(module)
    return "not built yet: " + ", ".join(missing) + " missing" if missing else None


_RUN_SNIPPET = "import sys; from kizuna.proxy.main import run; sys.exit(run(sys.argv[1]))"


def kizuna_proxy_argv(bootstrap: Path) -> list[str]:
    """``python -m kizuna proxy --bootstrap FILE`` when the CLI has that command, else ``proxy.main.run``."""
    try:
        has_cli = subprocess.run([sys.executable, "-m", "kizuna", "proxy", "--help"], capture_output=True,
                                 timeout=30).returncode == 0
    except subprocess.TimeoutExpired:
        has_cli = False
    if has_cli:
        return [sys.executable, "-m", "kizuna", "proxy", "--bootstrap", str(bootstrap)]
    return [sys.executable, "-c", _RUN_SNIPPET, str(bootstrap)]


def write_kizuna_bootstraps(layout: Layout, workdir: Path, origin: tuple[str, int] | None = None,
                            addresses: tuple[str, str, str] | None = None,
                            prefix: str = "kizuna") -> tuple[Path, Path, int]:
    """Static snapshots and bootstraps of the kizuna path's two sidecars (no control plane):
    ``(server bootstrap, client bootstrap, server inbound port)``. ``origin`` and ``addresses`` (client mesh,
    client pod, server mesh) default to the kizuna path's; the h2 path passes its own."""
    # Imported here so the other paths run while the proxy is still being written.
    from kizuna.proxyconfig.bootstrap import Bootstrap, Node
    from kizuna.testing.mesh import two_hop_snapshots

    o_addr, o_port = origin or layout.origin
    client_mesh, client_pod, server_mesh = addresses or (layout.kizuna_client_mesh, layout.kizuna_client_pod,
                                                         layout.kizuna_server_mesh)
    client_snap, server_snap = two_hop_snapshots(client_mesh, server_mesh, o_addr, o_port,
                                                 service=SERVICE, port=SERVICE_PORT)
    files = []
    for role, snap, node in (
        ("server", server_snap, Node(id="bench-server-0.default", workload="bench-server",
                                     pod_address=o_addr, mesh_address=server_mesh, ports=(o_port,))),
        ("client", client_snap, Node(id="bench-client-0.default", workload="bench-client",
                                     pod_address=client_pod, mesh_address=client_mesh)),
    ):
        snap_file = workdir / f"{prefix}-{role}-snapshot.json"
        snap_file.write_text(json.dumps(snap.to_json()))
        boot_file = workdir / f"{prefix}-{role}-bootstrap.json"
        Bootstrap(node=node, static_snapshot=str(snap_file)).dump(boot_file)
        files.append(boot_file)
    # The inbound listens on what the snapshot says (the app's target port, in Istio's terms).
    return files[0], files[1], server_snap.inbound[0].port


def start_kizuna(procs: Processes, layout: Layout, workdir: Path,
                 cpus: frozenset[int] | None) -> PathUnderTest:
    """Two kizuna sidecars on static snapshots (no control plane), the client one used as HTTP proxy."""
    from kizuna.proxyconfig.bootstrap import Bootstrap

    server_boot, client_boot, inbound = write_kizuna_bootstraps(layout, workdir)
    server = procs.start("kizuna-server-sidecar", kizuna_proxy_argv(server_boot), cpus)
    client = procs.start("kizuna-client-sidecar", kizuna_proxy_argv(client_boot), cpus)
    client_mesh, server_mesh = layout.kizuna_client_mesh, layout.kizuna_server_mesh
    outbound = Bootstrap.load(client_boot).outbound_port
    wait_for_port(server_mesh, inbound, START_TIMEOUT, server)
    wait_for_port(client_mesh, outbound, START_TIMEOUT, client)
    wait_until_serving((client_mesh, outbound), "the kizuna path", [client, server])
    return PathUnderTest("kizuna", (client_mesh, outbound), [client, server],
                         notes=f"client -> kizuna outbound (:{outbound}) -> kizuna inbound (:{inbound}) "
                               "-> origin")


STARTERS = {"direct": start_direct, "kizuna": start_kizuna, "haproxy": start_haproxy}
