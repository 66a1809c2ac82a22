"""gRPC through two captured sidecars (iptables REDIRECT, UID 1337) in network namespaces: a grpcio client in
pod A dials the service VIP directly, knowing nothing of the mesh; a grpcio server runs in pod B.

Reuses the namespace helpers of ``test_capture_iptables`` (same rules as the runtime installs), with its own
namespace number so both modules can run in one session. Needs root, ``ip``, ``iptables``, ``setpriv``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

if os.geteuid() != 0:
    pytest.skip("transparent capture needs root (network namespaces, iptables)", allow_module_level=True)
if any(shutil.which(tool) is None for tool in ("ip", "iptables", "setpriv", "curl")):
    pytest.skip("transparent capture needs ip, iptables, setpriv and curl", allow_module_level=True)

from test_capture_iptables import (  # noqa: E402  (a sibling test module: its namespace helpers)
    Pods,
    _network,
    _start_sidecar,
    _stop,
    _teardown,
    _wait_admin,
    ns_run,
)

from kizuna.testing.mesh import transparent_snapshots  # noqa: E402

GRPC_VIP, GRPC_PORT = "10.231.254.20", 50051

SERVER = r'''
import sys, time
from concurrent import futures
import grpc

def say(request, context):
    if request == b"unavailable":
        context.abort(grpc.StatusCode.UNAVAILABLE, "asked to fail")
    return b"b:" + request

handler = grpc.method_handlers_generic_handler("echo.Echo", {"Say": grpc.unary_unary_rpc_method_handler(say)})
server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
server.add_generic_rpc_handlers((handler,))
server.add_insecure_port(f"{sys.argv[1]}:{sys.argv[2]}")
server.start()
print("ready", flush=True)
server.wait_for_termination()
'''

CLIENT = r'''
import sys
import grpc
target, count = sys.argv[1], int(sys.argv[2])
with grpc.insecure_channel(target, options=[("grpc.enable_http_proxy", 0)]) as channel:
    say = channel.unary_unary("/echo.Echo/Say")
    calls = [say.future(b"n%d" % i, timeout=10) for i in range(count)]
    replies = [c.result() for c in calls]
    assert replies == [b"b:n%d" % i for i in range(count)], replies[:3]
    try:
        say(b"unavailable", timeout=5)
    except grpc.RpcError as exc:
        print(exc.code().name, exc.details())
print("ok", len(replies))
'''


@pytest.fixture(scope="module")
def pods() -> Iterator[Pods]:
    n = (os.getpid() + 101) % 200 + 20  # not test_capture_iptables' number
    workdir = Path(tempfile.mkdtemp(prefix="kzt-grpc-"))
    workdir.chmod(0o755)
    procs: list[subprocess.Popen[bytes]] = []
    files: list[Any] = []
    try:
        _network(n)
        p = Pods(n, f"kzt-a{n}", f"kzt-b{n}", f"10.231.{n}.2", f"10.231.{n}.3", f"10.231.{n}.1", workdir)
        services: list[tuple[str, int, str, int, Any]] = [("greeter", GRPC_PORT, GRPC_VIP, GRPC_PORT, "http")]
        client, server = transparent_snapshots(p.a_ip, p.b_ip, services)
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        app = subprocess.Popen(
            ["ip", "netns", "exec", p.b, sys.executable, "-c", SERVER, p.b_ip, str(GRPC_PORT)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True, env=env)
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


def test_grpc_client_dialling_a_vip_is_proxied_per_stream_by_both_sidecars(pods: Pods) -> None:
    a_before, b_before = pods.stats(pods.a_ip), pods.stats(pods.b_ip)
    result = ns_run(pods.a, sys.executable, "-c", CLIENT, f"{GRPC_VIP}:{GRPC_PORT}", "100", timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.split("\n")
    assert lines[0] == "UNAVAILABLE asked to fail"  # the app's own gRPC status, from its trailers
    assert lines[1] == "ok 100"
    a_after, b_after = pods.stats(pods.a_ip), pods.stats(pods.b_ip)
    # Streams, not opaque bytes: 101 requests routed by A, each on to B; one upstream connection or so.
    assert a_after["outbound"]["rq_total"] - a_before["outbound"]["rq_total"] == 101
    assert b_after["inbound"]["rq_total"] - b_before["inbound"]["rq_total"] == 103  # 101 + 2 retries
    assert a_after["retries"] - a_before["retries"] == 2  # Istio's default retryOn has unavailable
    assert a_after["upstream"]["cx_total"] - a_before["upstream"]["cx_total"] <= 3
    assert b_after["upstream"]["cx_total"] - b_before["upstream"]["cx_total"] <= 3
    assert a_after["tcp"]["cx_total"] == a_before["tcp"]["cx_total"]  # nothing was relayed as opaque TCP
