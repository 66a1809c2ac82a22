"""Trace context carried on by a Python app that does not forward headers: with the runtime's environment
(``process_env``), an ``http.server`` app that calls another service through ``urllib`` passes on the
``traceparent``, B3 headers and ``x-request-id`` of the request it serves; opted out, it does not."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from kizuna.runtime.workloads import Instance, process_env
from kizuna.testing.mesh import loopback_addresses

pytestmark = pytest.mark.integration

APP = textwrap.dedent("""\
    import http.server, json, sys, urllib.request
    address, port, backend = sys.argv[1], int(sys.argv[2]), sys.argv[3]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            # Calls the backend WITHOUT copying any header of the request it serves.
            with urllib.request.urlopen(backend, timeout=5) as r:
                body = r.read()
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    http.server.ThreadingHTTPServer((address, port), Handler).serve_forever()
    """)
BACKEND = textwrap.dedent("""\
    import http.server, json, sys
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({k.lower(): v for k, v in self.headers.items()}).encode()
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *args):
            pass
    http.server.ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), Handler).serve_forever()
    """)
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def instance(annotations: dict[str, str]) -> Instance:
    return Instance.from_json({"name": "app-0", "deployment": "app", "namespace": "default",
                               "serviceAccount": "default", "labels": {"app": "app"},
                               "podAddress": "127.0.0.1", "meshAddress": "127.0.0.1", "ports": [],
                               "command": [sys.executable], "env": {}, "workingDir": ".", "annotations": annotations})


def serve(script: str, address: str, port: int, tmp: Path, env: dict[str, str], *extra: str) -> subprocess.Popen[bytes]:
    path = tmp / f"{port}.py"
    path.write_text(script)
    return subprocess.Popen([sys.executable, str(path), address, str(port), *extra], env=env)


def wait(url: str, headers: dict[str, str]) -> dict[str, str]:
    deadline = time.monotonic() + 10
    while True:
        try:
            request = urllib.request.Request(url, headers=headers)
            with urllib.request.urlopen(request, timeout=5) as response:
                data: dict[str, str] = json.loads(response.read())
                return data
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.mark.parametrize("opted_out", [False, True])
def test_a_python_app_that_forwards_nothing_keeps_the_trace(tmp_path: Path, opted_out: bool) -> None:
    (address,) = loopback_addresses(1, prefix="127.94")
    env = process_env(instance({"kizuna.dev/trace-propagation": "false"} if opted_out else {}))
    env.pop("http_proxy", None)
    env["NO_PROXY"] = env["no_proxy"] = "*"
    backend = serve(BACKEND, address, 18101, tmp_path, env)
    app = serve(APP, address, 18102, tmp_path, env, f"http://{address}:18101/")
    try:
        seen = wait(f"http://{address}:18102/", {"traceparent": TRACEPARENT, "x-request-id": "req-1",
                                                  "x-b3-traceid": "4bf92f3577b34da6a3ce929d0e0e4736"})
    finally:
        for proc in (app, backend):
            proc.terminate()
            proc.wait(5)
    if opted_out:
        assert "traceparent" not in seen and "x-request-id" not in seen
    else:
        assert seen["traceparent"] == TRACEPARENT and seen["x-request-id"] == "req-1"
        assert seen["x-b3-traceid"] == "4bf92f3577b34da6a3ce929d0e0e4736"
