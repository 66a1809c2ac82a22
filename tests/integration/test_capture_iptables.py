"""Transparent capture end to end: two network namespaces with istio-iptables style rules, a real sidecar
process in each running as UID 1337 with ``capture: iptables``, a real app, and clients that know nothing of
the mesh (no proxy variables, dialling VIPs, names via Host, or plain addresses).

Topology (``N`` is derived from the test process id, so concurrent runs do not collide)::

    root namespace: bridge kztbrN 10.231.N.1/24 (+ an "external" server outside the mesh)
      ├── veth ── netns kzt-aN  10.231.N.2  client pod: sidecar A
      └── veth ── netns kzt-bN  10.231.N.3  server pod: sidecar B + app (HTTP :8080, TCP echo :9000,
                                                         undeclared TCP echo :9100)
    VIPs (never on an interface): web 10.231.254.10:80 → :8080 (http), echo 10.231.254.11:7000 → :9000 (tcp),
    pair 10.231.254.12:7100 → :9000 and :9100 (tcp, two endpoints; A's snapshot only)

Needs root, ``ip``, ``iptables``, ``setpriv`` and ``curl``; skips with the reason otherwise. Every namespace,
link and process is removed in ``finally`` blocks, also when a test fails.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kizuna.proxyconfig.model import Snapshot
from kizuna.testing.mesh import service_cluster, sidecar_bootstrap, simple_virtual_host, transparent_snapshots

pytestmark = pytest.mark.integration

SIDECAR_UID = 1337
ADMIN_PORT = 15000
WEB_VIP, WEB_PORT, WEB_TARGET = "10.231.254.10", 80, 8080
ECHO_VIP, ECHO_PORT, ECHO_TARGET = "10.231.254.11", 7000, 9000
UNDECLARED_PORT = 9100
PAIR_VIP, PAIR_PORT = "10.231.254.12", 7100
NOT_A_VIP = "10.231.253.7"
"""An address nothing owns: a request there with ``Host: web`` is routed by name."""

_missing = [tool for tool in ("ip", "iptables", "setpriv", "curl") if shutil.which(tool) is None]
if os.geteuid() != 0:
    pytest.skip("transparent capture needs root (network namespaces, iptables)", allow_module_level=True)
if _missing:
    pytest.skip(f"transparent capture needs {', '.join(_missing)}", allow_module_level=True)

APP = r'''
import json, socketserver, sys, http.server
address, http_port, echo_ports = sys.argv[1], int(sys.argv[2]), [int(p) for p in sys.argv[3:]]

class Web(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = json.dumps({"path": self.path, "host": self.headers.get("Host"), "peer": self.client_address[0],
                           "app": "b"}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass

class Echo(socketserver.BaseRequestHandler):
    def handle(self):
        while True:
            data = self.request.recv(65536)
            if not data:
                return
            if data == b"whoami\n":
                data = f"peer={self.client_address[0]} port={self.server.server_address[1]}\n".encode()
            self.request.sendall(data)

class Threading(socketserver.ThreadingMixIn, socketserver.TCPServer):
    allow_reuse_address = True
    daemon_threads = True

class WebServer(Threading):
    pass

import threading
servers = [Threading((address, p), Echo) for p in echo_ports]
for server in servers:
    threading.Thread(target=server.serve_forever, daemon=True).start()
web = http.server.ThreadingHTTPServer((address, http_port), Web)
print("ready", flush=True)
web.serve_forever()
'''

RAW_CLIENT = r'''
import socket, sys
host, port, payload = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode() + b"\n"
with socket.create_connection((host, port), timeout=5) as s:
    s.sendall(payload)
    data = b""
    while not data.endswith(b"\n"):
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
print(data.decode().strip())
'''


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=20, check=check)


def ns_run(ns: str, *args: str, timeout: float = 15) -> subprocess.CompletedProcess[str]:
    """Run a command in ``ns`` as root, with no proxy variables (the app knows nothing of the mesh)."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    return subprocess.run(["ip", "netns", "exec", ns, *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


@dataclass
class Pods:
    n: int
    a: str
    b: str
    a_ip: str
    b_ip: str
    host_ip: str
    workdir: Path

    def raw(self, ns: str, host: str, port: int, payload: str) -> str:
        result = ns_run(ns, sys.executable, "-c", RAW_CLIENT, host, str(port), payload)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    def curl(self, ns: str, url: str, *extra: str) -> tuple[int, dict[str, Any] | str]:
        result = ns_run(ns, "curl", "-s", "-m", "5", "--noproxy", "*", "-o", "-", "-w", "\n%{http_code}",
                        *extra, url)
        body, _, code = result.stdout.rpartition("\n")
        try:
            return int(code), json.loads(body)
        except ValueError:
            return int(code or 0), body

    def stats(self, ip: str) -> dict[str, Any]:
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
                f"http://{ip}:{ADMIN_PORT}/stats", timeout=5) as response:
            data: dict[str, Any] = json.loads(response.read())
            return data


def _rules(ns: str) -> None:
    """istio-iptables' nat rules (MESH-FACTS §4), as the runtime installs them."""
    nat = ["ip", "netns", "exec", ns, "iptables", "-t", "nat"]
    for chain in ("KZT_INBOUND", "KZT_OUTPUT"):
        sh(*nat, "-N", chain)
    sh(*nat, "-A", "PREROUTING", "-p", "tcp", "-j", "KZT_INBOUND")
    sh(*nat, "-A", "KZT_INBOUND", "-p", "tcp", "--dport", str(ADMIN_PORT), "-j", "RETURN")
    sh(*nat, "-A", "KZT_INBOUND", "-p", "tcp", "-j", "REDIRECT", "--to-ports", "15006")
    sh(*nat, "-A", "OUTPUT", "-p", "tcp", "-j", "KZT_OUTPUT")
    sh(*nat, "-A", "KZT_OUTPUT", "-o", "lo", "-s", "127.0.0.6/32", "-j", "RETURN")
    sh(*nat, "-A", "KZT_OUTPUT", "-p", "tcp", "!", "-d", "127.0.0.1/32", "-o", "lo", "-m", "owner", "--uid-owner",
       str(SIDECAR_UID), "-j", "REDIRECT", "--to-ports", "15006")
    sh(*nat, "-A", "KZT_OUTPUT", "-o", "lo", "-m", "owner", "!", "--uid-owner", str(SIDECAR_UID), "-j", "RETURN")
    sh(*nat, "-A", "KZT_OUTPUT", "-m", "owner", "--uid-owner", str(SIDECAR_UID), "-j", "RETURN")
    sh(*nat, "-A", "KZT_OUTPUT", "-d", "127.0.0.1/32", "-j", "RETURN")
    sh(*nat, "-A", "KZT_OUTPUT", "-p", "tcp", "-j", "REDIRECT", "--to-ports", "15001")


def _teardown(n: int) -> None:
    for side in ("a", "b"):
        sh("ip", "netns", "del", f"kzt-{side}{n}", check=False)
        sh("ip", "link", "del", f"kzt{side}{n}", check=False)
    sh("ip", "link", "del", f"kztbr{n}", check=False)


def _network(n: int) -> None:
    _teardown(n)  # leftovers of a run that was killed
    bridge = f"kztbr{n}"
    sh("ip", "link", "add", bridge, "type", "bridge")
    sh("ip", "addr", "add", f"10.231.{n}.1/24", "dev", bridge)
    sh("ip", "link", "set", bridge, "up")
    for side, host in (("a", 2), ("b", 3)):
        ns, veth = f"kzt-{side}{n}", f"kzt{side}{n}"
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", veth, "type", "veth", "peer", "name", f"{veth}p")
        sh("ip", "link", "set", f"{veth}p", "netns", ns)
        sh("ip", "-n", ns, "link", "set", f"{veth}p", "name", "eth0")
        sh("ip", "-n", ns, "addr", "add", f"10.231.{n}.{host}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", ns, "route", "add", "default", "via", f"10.231.{n}.1")
        sh("ip", "link", "set", veth, "master", bridge)
        sh("ip", "link", "set", veth, "up")
        _rules(ns)


def _wait_admin(ip: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"sidecar {ip} exited: {log.read_text()[-2000:]}")
        try:
            with socket.create_connection((ip, ADMIN_PORT), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"sidecar {ip} did not listen: {log.read_text()[-2000:]}")


def _start_sidecar(pods: Pods, ns: str, ip: str, snapshot: Snapshot) -> tuple[subprocess.Popen[bytes], Path]:
    name = ns.removeprefix("kzt-")
    snap = pods.workdir / f"{name}.snapshot.json"
    snap.write_text(json.dumps(snapshot.to_json()))
    boot = pods.workdir / f"{name}.bootstrap.json"
    sidecar_bootstrap(f"{name}.default", ip, pod_address=ip, static_snapshot=str(snap),
                      admin_port=ADMIN_PORT, capture="iptables").dump(boot)
    for path in (snap, boot):
        path.chmod(0o644)
    log = pods.workdir / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, "setpriv", "--reuid", str(SIDECAR_UID), "--regid", str(SIDECAR_UID),
             "--clear-groups", sys.executable, "-m", "kizuna.proxy.main", str(boot)],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=pods.workdir,
            env={k: v for k, v in os.environ.items() if "proxy" not in k.lower()})
    return proc, log


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, 15)
            proc.wait(5)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, 9)
            except ProcessLookupError:
                pass
            proc.wait(5)


class _HostEcho(socketserver.ThreadingMixIn, socketserver.TCPServer):
    allow_reuse_address = True
    daemon_threads = True


class _HostEchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        data = self.request.recv(65536)
        if data:
            self.request.sendall(b"external " + data)


@pytest.fixture(scope="module")
def pods() -> Iterator[Pods]:
    n = os.getpid() % 200 + 20
    workdir = Path(tempfile.mkdtemp(prefix="kzt-capture-"))
    workdir.chmod(0o755)  # the sidecars run as UID 1337 and read their bootstrap here
    procs: list[subprocess.Popen[bytes]] = []
    files: list[Any] = []
    try:
        _network(n)
        p = Pods(n, f"kzt-a{n}", f"kzt-b{n}", f"10.231.{n}.2", f"10.231.{n}.3", f"10.231.{n}.1", workdir)
        services: list[tuple[str, int, str, int, Any]] = [("web", WEB_PORT, WEB_VIP, WEB_TARGET, "http"),
                                                          ("echo", ECHO_PORT, ECHO_VIP, ECHO_TARGET, "tcp")]
        client, server = transparent_snapshots(p.a_ip, p.b_ip, services)
        pair = service_cluster("pair", PAIR_PORT, [(p.b_ip, ECHO_TARGET), (p.b_ip, UNDECLARED_PORT)],
                               protocol="tcp")
        pair_host = simple_virtual_host("pair", PAIR_PORT, pair.name, protocol="tcp")
        client = dataclasses.replace(
            client, clusters=(*client.clusters, pair),
            virtual_hosts=(*client.virtual_hosts, dataclasses.replace(pair_host, addresses=(PAIR_VIP,))))
        app_log = (workdir / "app.log").open("wb")
        files.append(app_log)
        app = subprocess.Popen(["ip", "netns", "exec", p.b, sys.executable, "-c", APP, p.b_ip, str(WEB_TARGET),
                                str(ECHO_TARGET), str(UNDECLARED_PORT)],
                               stdout=subprocess.PIPE, stderr=app_log, start_new_session=True)
        procs.append(app)
        files.append(app.stdout)
        assert app.stdout is not None and app.stdout.readline().strip() == b"ready"
        for ns, ip, snap in ((p.a, p.a_ip, client), (p.b, p.b_ip, server)):
            proc, log = _start_sidecar(p, ns, ip, snap)
            procs.append(proc)
            _wait_admin(ip, proc, log)
        yield p
    finally:
        for proc in procs:
            _stop(proc)
        for file in files:
            file.close()
        _teardown(n)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def host_echo(pods: Pods) -> Iterator[tuple[str, int]]:
    """A TCP server in the root namespace: outside the mesh, on the bridge address."""
    server = _HostEcho((pods.host_ip, 0), _HostEchoHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield pods.host_ip, server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_raw_tcp_client_to_vip_reaches_app_through_both_sidecars(pods: Pods) -> None:
    a_before, b_before = pods.stats(pods.a_ip), pods.stats(pods.b_ip)
    assert pods.raw(pods.a, ECHO_VIP, ECHO_PORT, "hello") == "hello"
    # The app sees B's inbound passthrough source: the connection went through sidecar B.
    assert pods.raw(pods.a, ECHO_VIP, ECHO_PORT, "whoami") == f"peer=127.0.0.6 port={ECHO_TARGET}"
    a_after, b_after = pods.stats(pods.a_ip), pods.stats(pods.b_ip)
    # Two connections, each relayed on both sides of each sidecar.
    assert a_after["tcp"]["cx_total"] - a_before["tcp"]["cx_total"] == 4
    assert b_after["tcp"]["cx_total"] - b_before["tcp"]["cx_total"] == 4


HOLD_TWO = r'''
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
first = socket.create_connection((host, port), timeout=5)
second = socket.create_connection((host, port), timeout=5)
for s in (first, second):
    s.sendall(b"whoami\n")
    print(s.recv(100).decode().strip())
'''


def test_opaque_tcp_is_balanced_by_open_connections(pods: Pods) -> None:
    # LEAST_REQUEST over connections: with one held open, the next one goes to the other endpoint.
    for _ in range(3):
        result = ns_run(pods.a, sys.executable, "-c", HOLD_TWO, PAIR_VIP, str(PAIR_PORT))
        assert result.returncode == 0, result.stderr
        ports = {line.rsplit("=", 1)[1] for line in result.stdout.split()
                 if line.startswith("port=")}
        assert ports == {str(ECHO_TARGET), str(UNDECLARED_PORT)}, result.stdout


def test_curl_to_vip_and_by_host_name_without_proxy_settings(pods: Pods) -> None:
    a_before, b_before = pods.stats(pods.a_ip), pods.stats(pods.b_ip)
    status, body = pods.curl(pods.a, f"http://{WEB_VIP}/headers")
    assert status == 200, body
    assert isinstance(body, dict) and body["path"] == "/headers" and body["peer"] == "127.0.0.6"
    # Host names the service: routed by name, wherever the connection was going.
    status, body = pods.curl(pods.a, f"http://{NOT_A_VIP}/by-name", "-H", "Host: web")
    assert status == 200, body
    assert isinstance(body, dict) and body["host"] == "web" and body["path"] == "/by-name"
    a_after, b_after = pods.stats(pods.a_ip), pods.stats(pods.b_ip)
    assert a_after["outbound"]["rq_total"] - a_before["outbound"]["rq_total"] == 2
    web_cluster = "outbound|80||web.default.svc.cluster.local"
    before = a_before["upstream"]["rq"].get(web_cluster, {}).get("2xx", 0)
    assert a_after["upstream"]["rq"][web_cluster]["2xx"] - before == 2
    assert (b_after["inbound"]["rq_by_port"][str(WEB_TARGET)]
            - b_before["inbound"]["rq_by_port"].get(str(WEB_TARGET), 0)) == 2


def test_passthrough_to_addresses_that_are_not_vips(pods: Pods, host_echo: tuple[str, int]) -> None:
    # Outside the mesh (the root namespace): forwarded untouched, TCP and HTTP alike (ALLOW_ANY).
    host, port = host_echo
    assert pods.raw(pods.a, host, port, "ping") == "external ping"
    # Another pod's undeclared port: A passes it through, B's inbound passthrough forwards it to the app.
    assert pods.raw(pods.a, pods.b_ip, UNDECLARED_PORT, "whoami") == f"peer=127.0.0.6 port={UNDECLARED_PORT}"
    status, body = pods.curl(pods.a, f"http://{pods.b_ip}:{WEB_TARGET}/direct")
    assert status == 200 and isinstance(body, dict) and body["path"] == "/direct", body
    assert body["peer"] == "127.0.0.6"
    assert pods.stats(pods.a_ip)["upstream"]["rq"]["PassthroughCluster"]["2xx"] >= 1


def test_app_calls_its_own_pod_ip_and_its_own_vip(pods: Pods) -> None:
    status, body = pods.curl(pods.b, f"http://{pods.b_ip}:{WEB_TARGET}/self")
    assert status == 200 and isinstance(body, dict), body
    assert body["peer"] == pods.b_ip  # the app's own loopback traffic is not captured
    status, body = pods.curl(pods.b, f"http://{WEB_VIP}/self-vip")
    assert status == 200 and isinstance(body, dict) and body["path"] == "/self-vip", body
    assert body["peer"] == "127.0.0.6"
    assert pods.raw(pods.b, ECHO_VIP, ECHO_PORT, "self") == "self"


def test_sidecar_never_loops_to_itself(pods: Pods) -> None:
    before = pods.stats(pods.a_ip)
    # The app dials the sidecar's outbound port directly: not redirected, so not passed through to itself.
    status, body = pods.curl(pods.a, f"http://{pods.a_ip}:15001/loop")
    assert status == 404 and "no route" in str(body)
    status, _ = pods.curl(pods.a, f"http://{WEB_VIP}/once")
    assert status == 200
    after = pods.stats(pods.a_ip)
    # Each request was seen exactly once: the sidecar's upstream connection was not captured again.
    assert after["outbound"]["rq_total"] - before["outbound"]["rq_total"] == 2
    assert after["downstream"]["cx_total"] - before["downstream"]["cx_total"] == 2
