"""The kizuna path with mutual TLS between the two sidecars, as Istio measures itself (mTLS on), and its
reference: the HAProxy pair with mutual TLS between its two hops (same certificates).

Same topology and static snapshots as the ``kizuna`` path; in addition a CA made for the run signs one
certificate per sidecar, mounted as files (``Bootstrap.cert_dir``, Istio's ``cert-chain.pem`` / ``key.pem`` /
``root-cert.pem``), and the client's endpoint carries the server's identity, so the hop between the sidecars
is mTLS with secure naming checked on every new connection.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from bench.paths import (
    HAPROXY,
    SERVICE,
    SERVICE_PORT,
    START_TIMEOUT,
    Layout,
    PathUnderTest,
    kizuna_proxy_argv,
    render_haproxy,
    wait_until_serving,
)
from bench.procs import Processes, wait_for_port

SERVER_ACCOUNT = "bench-server"


def _addresses(layout: Layout) -> tuple[str, str, str]:
    """(client mesh, client pod, server mesh) of this path: its own, beside the plaintext path's."""
    return f"{layout.net}.51", f"{layout.net}.52", f"{layout.net}.53"


def _certificates(workdir: Path, accounts: tuple[str, ...]) -> dict[str, Path]:
    """A fresh CA in ``workdir`` and a certificate directory per service account."""
    from kizuna.controlplane.ca import CertificateAuthority
    from kizuna.proxy.csr import key_and_csr

    ca = CertificateAuthority.load_or_create(workdir / "mtls-ca")
    dirs = {}
    for account in accounts:
        key, csr = key_and_csr(f"spiffe://cluster.local/ns/default/sa/{account}")
        issued = ca.sign(csr, "default", account, ca.credential("default", account))
        folder = workdir / f"mtls-certs-{account}"
        folder.mkdir(exist_ok=True)
        (folder / "cert-chain.pem").write_text(issued.cert_chain)
        (folder / "key.pem").write_text(key)
        (folder / "key.pem").chmod(0o600)
        (folder / "root-cert.pem").write_text(issued.roots)
        dirs[account] = folder
    return dirs


def start_kizuna_mtls(procs: Processes, layout: Layout, workdir: Path,
                      cpus: frozenset[int] | None) -> PathUnderTest:
    """Two kizuna sidecars on static snapshots with file-mounted certificates; mTLS between them."""
    from kizuna.proxyconfig.bootstrap import Bootstrap, Node
    from kizuna.testing.mesh import two_hop_snapshots

    client_mesh, client_pod, server_mesh = _addresses(layout)
    o_addr, o_port = layout.origin
    client_snap, server_snap = two_hop_snapshots(client_mesh, server_mesh, o_addr, o_port, service=SERVICE,
                                                 port=SERVICE_PORT)
    identity = f"cluster.local/ns/default/sa/{SERVER_ACCOUNT}"
    client_snap = dataclasses.replace(client_snap, clusters=tuple(
        dataclasses.replace(c, endpoints=tuple(dataclasses.replace(e, identity=identity) for e in c.endpoints))
        for c in client_snap.clusters))
    certs = _certificates(workdir, (SERVER_ACCOUNT, "bench-client"))
    boots = []
    for role, snap, node in (
        ("server", server_snap, Node(id="bench-server-0.default", workload="bench-server",
                                     service_account=SERVER_ACCOUNT, pod_address=o_addr,
                                     mesh_address=server_mesh, ports=(o_port,))),
        ("client", client_snap, Node(id="bench-client-0.default", workload="bench-client",
                                     service_account="bench-client", pod_address=client_pod,
                                     mesh_address=client_mesh)),
    ):
        snap_file = workdir / f"kizuna-mtls-{role}-snapshot.json"
        snap_file.write_text(json.dumps(snap.to_json()))
        boot = workdir / f"kizuna-mtls-{role}-bootstrap.json"
        Bootstrap(node=node, static_snapshot=str(snap_file), cert_dir=str(certs[node.service_account])).dump(boot)
        boots.append(boot)
    inbound = server_snap.inbound[0].port
    server = procs.start("kizuna-mtls-server-sidecar", kizuna_proxy_argv(boots[0]), cpus)
    client = procs.start("kizuna-mtls-client-sidecar", kizuna_proxy_argv(boots[1]), cpus)
    outbound = Bootstrap.load(boots[1]).outbound_port
    wait_for_port(server_mesh, inbound, START_TIMEOUT, server)
    wait_for_port(client_mesh, outbound, START_TIMEOUT, client)
    wait_until_serving((client_mesh, outbound), "the kizuna mTLS path", [client, server])
    return PathUnderTest("kizuna-mtls", (client_mesh, outbound), [client, server],
                         notes=f"client -> kizuna outbound (:{outbound}) -mTLS-> kizuna inbound (:{inbound}) "
                               "-> origin")


def _haproxy_addresses(layout: Layout) -> tuple[tuple[str, int], tuple[str, int]]:
    """(client hop, server hop) of the HAProxy mTLS path, beside the plaintext pair's."""
    return (f"{layout.net}.54", 15001), (f"{layout.net}.55", 80)


def start_haproxy_mtls(procs: Processes, layout: Layout, workdir: Path,
                       cpus: frozenset[int] | None) -> PathUnderTest:
    """The HAProxy reference with mutual TLS between its hops: the client hop originates TLS with a client
    certificate and verifies the server hop against the run's CA, which requires a client certificate."""
    certs = _certificates(workdir, ("haproxy-server", "haproxy-client"))
    pems = {}
    for account, folder in certs.items():
        pem = folder / "haproxy.pem"  # HAProxy wants certificate chain and key in one file
        pem.write_text((folder / "cert-chain.pem").read_text() + (folder / "key.pem").read_text())
        pem.chmod(0o600)
        pems[account] = pem
    roots = certs["haproxy-server"] / "root-cert.pem"
    (c_addr, c_port), (s_addr, s_port) = _haproxy_addresses(layout)
    o_addr, o_port = layout.origin
    server_cfg = render_haproxy(
        "haproxy-hop.cfg.tmpl", workdir / "haproxy-mtls-server-hop.cfg",
        bind=f"{s_addr}:{s_port} ssl crt {pems['haproxy-server']} ca-file {roots} verify required",
        server=f"{o_addr}:{o_port}")
    client_cfg = render_haproxy(
        "haproxy-hop.cfg.tmpl", workdir / "haproxy-mtls-client-hop.cfg", bind=f"{c_addr}:{c_port}",
        server=f"{s_addr}:{s_port} ssl crt {pems['haproxy-client']} ca-file {roots} verify required")
    server = procs.start("haproxy-mtls-server-hop", [HAPROXY, "-db", "-f", str(server_cfg)], cpus)
    client = procs.start("haproxy-mtls-client-hop", [HAPROXY, "-db", "-f", str(client_cfg)], cpus)
    wait_for_port(s_addr, s_port, START_TIMEOUT, server)
    wait_for_port(c_addr, c_port, START_TIMEOUT, client)
    wait_until_serving((c_addr, c_port), "the haproxy mTLS path", [client, server])
    return PathUnderTest("haproxy-mtls", (c_addr, c_port), [client, server],
                         notes=f"client -> haproxy (:{c_port}) -mTLS-> haproxy (:{s_port}) -> origin")
