"""Istio's TCP traffic shifting, locally: a weighted ``tcp`` route (80/20 between two subsets) splits new
connections from a client that knows nothing of the mesh (a raw socket to ``tcp-echo:9000``, captured by
iptables), over 1,000 connections within ±5 points."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tcp-echo"
CONNECTIONS = 1000

# Runs inside the client's network namespace: one connection per line, each answered "one ..." or "two ...".
CLIENT = """
import socket, sys
for i in range(int(sys.argv[1])):
    with socket.create_connection(("tcp-echo", 9000), timeout=5) as s:
        s.sendall(b"hello\\n")
        data = b""
        while not data.endswith(b"\\n"):
            chunk = s.recv(64)
            if not chunk:
                break
            data += chunk
        print(data.decode().split(" ")[0] or "closed")
"""


def connect_many(mesh: Any, n: int) -> Counter[str]:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and k != "KIZUNA_STATE_DIR"}
    result = subprocess.run([sys.executable, "-m", "kizuna", "exec", "--state-dir", str(mesh.state), "tcp-client",
                             "--", sys.executable, "-c", CLIENT, str(n)],
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    return Counter(result.stdout.split())


def route_in_client(mesh: Any) -> bool:
    """The client's sidecar runs a config with the weighted route (its admin /config_dump, from the host)."""
    address = mesh.instance("tcp-client")["podAddress"]
    with urllib.request.urlopen(f"http://{address}:15000/config_dump", timeout=5) as response:
        return "|v2|tcp-echo" in response.read().decode()


def test_tcp_route_weights_split_connections_80_20(transparent_mesh_factory: Callable[..., Any],
                                                   kit: Any) -> None:
    mesh = transparent_mesh_factory(EXAMPLE / "tcp-echo.yaml", EXAMPLE / "networking" / "destination-rule.yaml")
    # Without a route: both versions serve (balanced across the two endpoints).
    assert set(connect_many(mesh, 40)) == {"one", "two"}
    applied = mesh.kizuna("apply", "-f", EXAMPLE / "networking" / "virtual-service-80-20.yaml")
    assert applied.returncode == 0, applied.stderr
    kit.wait_until(lambda: route_in_client(mesh), 5.0, "the weighted route in the client's sidecar")
    counts = connect_many(mesh, CONNECTIONS)
    assert sum(counts.values()) == CONNECTIONS and set(counts) <= {"one", "two"}, counts
    share_v2 = counts["two"] / CONNECTIONS
    assert 0.15 <= share_v2 <= 0.25, counts
