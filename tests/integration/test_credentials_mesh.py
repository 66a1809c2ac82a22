"""Bootstrap credentials are handed to their own workload only: in a running mesh (proxy and transparent mode)
each credential is in a file of its own, mode 0600 (owned by the sidecar's UID in transparent mode), and no
other file kizuna wrote (bootstraps, runtime record, logs, the run directory) nor any app's environment or
command line holds one. Each sidecar still obtains its certificate with it.

What this does not claim: in proxy mode every process runs as the user's UID, and in transparent mode apps run
as root, so file modes alone do not keep a hostile app from another workload's file (docs/architecture.md,
"Who can read a credential").
"""

from __future__ import annotations

import ipaddress
import json
import os
import stat
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "httpbin"
BLOCK = ipaddress.IPv4Network("127.106.128.0/18")
PROXY_UID = 1337
Mesh = Any


def credentials(state: Path, ids: dict[str, tuple[str, str]]) -> dict[str, str]:
    """Each proxy's credential by node id, computed as the CA checks it (``ids``: node id → (ns, sa))."""
    from kizuna.controlplane.credentials import credential_for, load_or_create_secret, spiffe_id

    secret = load_or_create_secret(state)
    return {node: credential_for(secret, spiffe_id("cluster.local", ns, sa)) for node, (ns, sa) in ids.items()}


def files_under(root: Path, skip: set[Path]) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink() and p not in skip
            and not any(parent in skip for parent in p.parents)]


def identity(address: str) -> Any:
    with urllib.request.urlopen(f"http://{address}:15000/config_dump", timeout=10) as response:
        return json.load(response).get("identity", {}).get("identity")


def check(mesh: Mesh, kit: Any, with_gateway: bool, run_dir: Path | None) -> None:
    instances = mesh.runtime()["instances"]
    ids = {f"{i['name']}.{i['namespace']}": (i["namespace"], i["serviceAccount"]) for i in instances}
    if with_gateway:
        ids["istio-ingressgateway-0.istio-system"] = ("istio-system", "istio-ingressgateway")
    secrets = credentials(mesh.state, ids)
    for i in instances:  # every sidecar got its certificate with its own credential
        kit.wait_until(lambda a=i["meshAddress"]: identity(a), 30, f"{i['name']}'s certificate")

    own: dict[str, Path] = {}
    for node, secret in secrets.items():
        path = (run_dir / f"{node}.credential") if run_dir and node in {f"{i['name']}.{i['namespace']}"
                                                                         for i in instances} \
            else mesh.state / "identities" / f"{node}.credential"
        info = path.stat()
        assert stat.S_IMODE(info.st_mode) == 0o600, path
        if run_dir is not None and path.parent == run_dir:
            assert info.st_uid == PROXY_UID, path
        assert path.read_text().strip() == secret
        own[node] = path
    if run_dir is None:
        assert stat.S_IMODE((mesh.state / "identities").stat().st_mode) == 0o700

    # The CA's own directory holds the secret they derive from (the control plane's, never an app's files).
    skip = {mesh.state / "ca", *own.values()}
    written = files_under(mesh.state, skip) + (files_under(run_dir, skip) if run_dir else [])
    assert any(p.parent.name == "proxies" for p in written)  # the bootstraps are among what was searched
    for path in written:
        text = path.read_bytes()
        leaked = [node for node, secret in secrets.items() if secret.encode() in text]
        assert not leaked, f"{path} holds the credential of {leaked}"
    for process in mesh.runtime()["processes"]:
        if process["role"] != "app":
            continue
        for part in ("environ", "cmdline"):
            data = Path(f"/proc/{process['pid']}/{part}").read_bytes()
            assert not any(s.encode() in data for s in secrets.values()), f"{process['name']} {part}"


def test_proxy_mode_each_credential_is_its_workloads_alone(mesh_factory: Callable[..., Mesh], kit: Any,
                                                           tmp_path_factory: pytest.TempPathFactory) -> None:
    from kizuna.runtime.addresses import choose_pod_range

    pods = choose_pod_range(str(tmp_path_factory.mktemp("seed")), block=BLOCK).network
    gateway = f"127.106.{pods.network_address.packed[2]}.250"
    mesh = mesh_factory(EXAMPLE / "httpbin.yaml", EXAMPLE / "sleep.yaml",
                        extra=["--pod-cidr", str(pods), "--gateway", "on", "--gateway-address", gateway,
                               "--gateway-port", "18080", "--gateway-https-port", "18443"])
    check(mesh, kit, with_gateway=True, run_dir=None)


def test_transparent_mode_each_credential_is_its_sidecars_alone(transparent_mesh_factory: Callable[..., Mesh],
                                                                kit: Any) -> None:
    from kizuna.runtime.netns import Names, mesh_id

    mesh = transparent_mesh_factory(EXAMPLE / "httpbin.yaml", EXAMPLE / "sleep.yaml")
    run_dir = Names(mesh_id(mesh.state.absolute())).run_dir
    assert os.path.isdir(run_dir)
    check(mesh, kit, with_gateway=False, run_dir=run_dir)
