"""Istio's mTLS-migration task on live traffic (transparent mode, real ``kizuna up``), with its own files: they
carry no namespace, and the page applies the same text with ``kubectl apply -n foo`` (namespace-wide STRICT)
and then ``-n istio-system`` (the root namespace: mesh-wide). Clients with sidecars keep calling throughout and
none of their requests fails; the client without a sidecar (namespace legacy) loses foo, then bar.

Also ``kizuna apply/delete -n``'s contract with kubectl: a document naming another namespace is an error.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from tests.integration.security_task_apps import task_apps

from kizuna.testing.samples import ISTIO_SAMPLES

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not (ISTIO_SAMPLES / "tasks").is_dir(), reason="Istio sample corpus not present")]

TASKS = ISTIO_SAMPLES / "tasks"
STRICT_FOO = TASKS / "mtls-migration" / "01-peerauthentication-default-strict-ns-foo.yaml"
STRICT_MESH = TASKS / "mtls-migration" / "02-peerauthentication-default-strict-ns-istio-system.yaml"
Mesh = Any

LOOP = """
import json, os, sys, time, urllib.error, urllib.request
stop, limit, deadline = sys.argv[1], int(sys.argv[2]), time.monotonic() + float(sys.argv[3])
counts = {}
for i in range(limit):
    if os.path.exists(stop) or time.monotonic() > deadline:
        break
    url = ("http://httpbin.foo:8000/ip", "http://httpbin.bar:8000/ip")[i % 2]
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            code = str(r.status)
    except urllib.error.HTTPError as e:
        code = f"{e.code} {e.headers.get('x-kizuna-error')}"
    except OSError as e:
        code = f"error {e}"
    counts[code] = counts.get(code, 0) + 1
    if i == 0:
        print("started", flush=True)
print(json.dumps(counts))
"""
"""A mesh client's request loop (run inside its namespace): new connection per request, alternating foo and
bar, bounded in count and time, stopped early by a file; prints ``started`` after its first request, and
``{outcome: count}`` at the end."""


def env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and k != "KIZUNA_STATE_DIR"}


def exec_argv(mesh: Mesh, namespace: str, *argv: str) -> list[str]:
    return [sys.executable, "-m", "kizuna", "exec", "--state-dir", str(mesh.state), "-n", namespace, "sleep", "--",
            *argv]


@pytest.fixture(scope="module")
def mesh(transparent_mesh_factory: Callable[..., Mesh], tmp_path_factory: pytest.TempPathFactory) -> Mesh:
    apps = tmp_path_factory.mktemp("migration") / "apps.yaml"
    apps.write_text(task_apps())
    return transparent_mesh_factory(apps)


def from_legacy(mesh: Mesh) -> dict[str, str]:
    """sleep.legacy (no sidecar) curls httpbin.foo and httpbin.bar: ``"200"`` or ``"403 <x-kizuna-error>"``."""
    urls = [a for ns in ("foo", "bar") for a in ("-o", "/dev/null", f"http://httpbin.{ns}:8000/ip")]
    result = subprocess.run(exec_argv(mesh, "legacy", "curl", "-s", "-m", "10", "-w",
                                      "%{http_code} %header{x-kizuna-error}\\n", *urls),
                            capture_output=True, text=True, timeout=60, env=env())
    lines = [line.strip() for line in result.stdout.splitlines()]
    assert len(lines) == 2, f"curl from legacy: {result.returncode} {result.stdout!r} {result.stderr}"
    return {"foo": lines[0], "bar": lines[1]}


def legacy_becomes(mesh: Mesh, foo: str, bar: str) -> None:
    seen: list[dict[str, str]] = []
    deadline = time.monotonic() + 30
    while True:
        seen.append({k: v.split(" ")[0] for k, v in from_legacy(mesh).items()})
        if seen[-1] == {"foo": foo, "bar": bar}:
            return
        assert time.monotonic() < deadline, f"legacy never saw foo {foo}, bar {bar}: last {seen[-3:]}"
        time.sleep(0.3)


def test_permissive_to_strict_without_a_failed_mesh_request(mesh: Mesh, kit: Any, tmp_path: Path) -> None:
    legacy_becomes(mesh, "200", "200")  # PERMISSIVE (Istio's default): plaintext from legacy is served
    stop = tmp_path / "stop"
    loops = [subprocess.Popen(exec_argv(mesh, ns, "python", "-c", LOOP, str(stop), "3000", "90"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
             for ns in ("foo", "bar")]
    try:
        for loop in loops:  # both loops are under way before the first switch
            assert loop.stdout is not None and loop.stdout.readline().strip() == "started"
        time.sleep(0.5)
        assert mesh.kizuna("apply", "-n", "foo", "-f", STRICT_FOO).returncode == 0
        legacy_becomes(mesh, "403", "200")
        assert from_legacy(mesh)["foo"].startswith("403 mTLS required")
        stored = json.loads(mesh.kizuna("get", "pa", "-n", "foo", "-o", "json").stdout)["items"]
        assert [(i["metadata"]["namespace"], i["metadata"]["name"]) for i in stored] == [("foo", "default")]
        time.sleep(1.0)
        assert mesh.kizuna("apply", "-n", "istio-system", "-f", STRICT_MESH).returncode == 0
        legacy_becomes(mesh, "403", "403")
        time.sleep(1.0)
    finally:
        stop.touch()
        outputs = []
        for loop in loops:
            try:
                out, err = loop.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                loop.kill()
                out, err = loop.communicate()
            outputs.append((out, err))
    for (out, err), ns in zip(outputs, ("foo", "bar"), strict=True):
        counts = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
        assert set(counts) == {"200"} and counts["200"] >= 20, f"sleep.{ns}'s loop: {counts} {err[-2000:]}"


def test_namespace_flag_conflicting_with_the_document_is_refused(kit: Any, tmp_path: Path) -> None:
    named_foo = TASKS / "authn-policy" / "02-peerauthentication-default-foo-strict.yaml"
    for verb in ("apply", "delete"):
        result = kit.run_kizuna(verb, "--state-dir", tmp_path, "-n", "bar", "-f", named_foo)
        assert result.returncode == 1, (verb, result.stdout, result.stderr)
        assert ('the namespace from the provided object "foo" does not match the namespace "bar". You must '
                "pass '--namespace=foo' to perform this operation.") in result.stderr
        assert named_foo.name in result.stderr
