"""Trace context carried on by a Python app that does not forward headers: with the runtime's environment
(``process_env``), an ``http.server`` app that calls another service through ``urllib`` passes on the
``traceparent``, B3 headers and ``x-request-id`` of the request it serves, whether OpenTelemetry comes from the
app's environment, is borrowed from kizuna's by another interpreter, or cannot be loaded (the stdlib fallback,
which says so on stderr); opted out, it does not."""

from __future__ import annotations

import json
import os
import shutil
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


SYSTEM_PYTHON = "/usr/bin/python3"
"""Another interpreter of the same Python version, whose environment has no OpenTelemetry."""


def other_python() -> str:
    """SYSTEM_PYTHON when it is the same Python version as ours and lacks OpenTelemetry, else skip."""
    code = "import importlib.util, sys; print(sys.implementation.cache_tag, importlib.util.find_spec('opentelemetry'))"
    if shutil.which(SYSTEM_PYTHON) is None:
        pytest.skip(f"no {SYSTEM_PYTHON}")
    found = subprocess.run([SYSTEM_PYTHON, "-I", "-c", code], capture_output=True, text=True, timeout=10).stdout
    if found.split() != [sys.implementation.cache_tag, "None"]:
        pytest.skip(f"{SYSTEM_PYTHON} is not {sys.implementation.cache_tag} without OpenTelemetry: {found}")
    return SYSTEM_PYTHON


def serve(script: str, address: str, port: int, tmp: Path, env: dict[str, str], *extra: str,
          python: str = sys.executable) -> subprocess.Popen[bytes]:
    path = tmp / f"{port}.py"
    path.write_text(script)
    with open(tmp / f"{port}.err", "wb") as stderr:
        return subprocess.Popen([python, str(path), address, str(port), *extra], env=env, stderr=stderr)


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


@pytest.mark.parametrize("mode", ["otel", "borrowed", "fallback", "other-python", "opted-out"])
def test_a_python_app_that_forwards_nothing_keeps_the_trace(tmp_path: Path, mode: str) -> None:
    """otel: the app's environment has OpenTelemetry (kizuna's venv); borrowed: another interpreter uses
    kizuna's; fallback: OpenTelemetry turned off; other-python: kizuna's packages are for another version."""
    (address,) = loopback_addresses(1, prefix="127.78")
    env = process_env(instance({"kizuna.dev/trace-propagation": "false"} if mode == "opted-out" else {}))
    env.pop("http_proxy", None)
    env["NO_PROXY"] = env["no_proxy"] = "*"
    python = other_python() if mode in ("borrowed", "other-python") else sys.executable
    if mode == "fallback":
        env["KIZUNA_AUTOTRACE_OTEL"] = "0"
    if mode == "other-python":
        env["KIZUNA_AUTOTRACE_PYTHON"] = "cpython-399"
    backend = serve(BACKEND, address, 18101, tmp_path, env, python=python)
    app = serve(APP, address, 18102, tmp_path, env, f"http://{address}:18101/", python=python)
    try:
        seen = wait(f"http://{address}:18102/", {"traceparent": TRACEPARENT, "x-request-id": "req-1",
                                                  "x-b3-traceid": "4bf92f3577b34da6a3ce929d0e0e4736"})
    finally:
        for proc in (app, backend):
            proc.terminate()
            proc.wait(5)
    errors = (tmp_path / "18102.err").read_text()
    if mode == "opted-out":
        assert "traceparent" not in seen and "x-request-id" not in seen
        return
    assert seen["traceparent"] == TRACEPARENT and seen["x-request-id"] == "req-1"
    assert seen["x-b3-traceid"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    if mode in ("fallback", "other-python"):
        assert errors.count("trace headers are carried by the stdlib fallback") == 1, errors
    else:
        assert "kizuna" not in errors, errors


def test_a_borrowed_opentelemetry_leaves_the_apps_path_alone(tmp_path: Path) -> None:
    python = other_python()
    env = process_env(instance({}))
    code = ("import os, sys; import urllib.request; "
            "print(os.environ['KIZUNA_AUTOTRACE_PATH'] in sys.path, 'opentelemetry.propagate' in sys.modules)")
    out = subprocess.run([python, "-c", code], env=env, capture_output=True, text=True, timeout=30)
    assert (out.stdout.split(), out.stderr) == (["False", "True"], "")


def test_the_apps_own_sitecustomize_still_runs(tmp_path: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text("import builtins\nbuiltins.APP_SITE = 'ran'\n")
    env = process_env(instance({}))
    env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], str(tmp_path)])
    code = "import builtins, sys; print(builtins.APP_SITE, 'opentelemetry.propagate' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=30)
    assert (out.stdout.split(), out.stderr) == (["ran", "True"], "")


WSGI_APP = textwrap.dedent("""\
    import os, urllib.request

    def app(environ, start_response):
        # Calls the backend WITHOUT copying any header of the request it serves.
        with urllib.request.urlopen(os.environ["BACKEND"], timeout=5) as r:
            body = r.read()
        start_response("200 OK", [("content-length", str(len(body)))])
        return [body]
    """)


@pytest.mark.parametrize("fallback", [False, True])
def test_a_gunicorn_app_that_forwards_nothing_keeps_the_trace(tmp_path: Path, fallback: bool) -> None:
    (address,) = loopback_addresses(1, prefix="127.78")
    env = process_env(instance({}))
    env.pop("http_proxy", None)
    env["NO_PROXY"] = env["no_proxy"] = "*"
    env["BACKEND"] = f"http://{address}:18103/"
    if fallback:
        env["KIZUNA_AUTOTRACE_OTEL"] = "0"
    (tmp_path / "wsgi_app.py").write_text(WSGI_APP)
    backend = serve(BACKEND, address, 18103, tmp_path, env)
    app = subprocess.Popen([str(Path(sys.executable).parent / "gunicorn"), "-b", f"{address}:18104", "-w", "1",
                            "--chdir", str(tmp_path), "wsgi_app:app"], env=env, stderr=subprocess.DEVNULL)
    try:
        seen = wait(f"http://{address}:18104/", {"traceparent": TRACEPARENT, "x-request-id": "req-2"})
        fresh = wait(f"http://{address}:18104/", {})
    finally:
        for proc in (app, backend):
            proc.terminate()
            proc.wait(5)
    assert seen["traceparent"] == TRACEPARENT and seen["x-request-id"] == "req-2"
    assert "traceparent" not in fresh and "x-request-id" not in fresh  # nothing left over from the last request
