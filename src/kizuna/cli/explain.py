"""``kizuna explain --from WORKLOAD URL``: how that workload's sidecar routes a request, and why.

The snapshot comes from the sidecar itself (admin ``/config_dump``: the config it runs, not a recompilation),
and the routing is the proxy's own code (``kizuna.proxy.explain`` over ``Router``). Then, for each destination,
the destination instance's sidecar config (its ``security``) decides authorization as its inbound side would
(``Authorizer``), with the source workload's SPIFFE identity as the principal when the hop is mTLS.

``--from istio-ingressgateway`` (or the gateway's node id) asks the ingress gateway instead: the URL's port is
the gateway's Service port (80 and 443 reach its listeners 8080 and 8443, as Istio's ingress Service maps them),
its host picks a virtual host of the Gateway-bound VirtualServices on that listener (a port in the host is
ignored, as the gateway ignores it in Host and ``:authority``).
"""

from __future__ import annotations

import argparse
import json
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlsplit

from kizuna.proxy.explain import AuthzExplanation, Explanation, explain, explain_authorization
from kizuna.proxyconfig.bootstrap import ADMIN_PORT
from kizuna.proxyconfig.model import Snapshot
from kizuna.runtime.errors import UserError
from kizuna.runtime.exec import find_instance
from kizuna.runtime.gateway import HTTP_TARGET_PORT, HTTPS_TARGET_PORT
from kizuna.runtime.gateway import NAME as GATEWAY_NAME
from kizuna.runtime.gateway import node as gateway_node
from kizuna.runtime.state import StateDir
from kizuna.runtime.workloads import Instance

GATEWAY_PORTS = {80: HTTP_TARGET_PORT, 443: HTTPS_TARGET_PORT}
"""Istio's ingress Service: the port a client calls → the gateway listener it reaches."""


def run(state: StateDir, args: argparse.Namespace) -> int:
    """Print the explanation (text, or JSON with ``-o json``)."""
    at_gateway = _gateway(state, args.source)
    instance: Instance | None = None
    if at_gateway is None:
        instance = find_instance(state, args.source, args.namespace)
        source_id, address = instance.id, instance.mesh_address
    else:
        source_id, address = at_gateway
    admin = f"http://{address}:{ADMIN_PORT}/config_dump"
    proxy = "proxy" if at_gateway is not None else "sidecar"
    try:
        with urllib.request.urlopen(admin, timeout=5) as response:
            dump = json.load(response)
    except (OSError, urllib.error.URLError, ValueError) as exc:
        raise UserError(f"cannot read the config of {source_id}'s {proxy} at {admin}: {exc}") from None
    snapshot = Snapshot.from_json(dump["snapshot"])
    ejected = _ejections(address)
    url = urlsplit(args.url if "://" in args.url else f"http://{args.url}")
    if not url.hostname:
        raise UserError(f"{args.url}: not a URL with a host")
    port = url.port or (443 if url.scheme == "https" else 80)
    if at_gateway is not None:
        port = GATEWAY_PORTS.get(port, port)
    headers = {"host": url.netloc}
    for line in args.header:
        name, sep, value = line.partition(":")
        if not sep:
            raise UserError(f"-H {line!r}: expected 'Name: value'")
        headers[name.strip().lower()] = value.strip()
    path = (url.path or "/") + (f"?{url.query}" if url.query else "")
    result = explain(snapshot, url.hostname, port, args.request.upper(), path, headers, ejected)
    principal = str((dump.get("identity") or {}).get("identity") or "").removeprefix("spiffe://")
    authz = authorization(state, result, instance or address, principal, headers)
    if args.output == "json":
        print(json.dumps({"from": source_id, "configVersion": dump.get("version"), **result.to_json(),
                          "authorization": [a.to_json() if isinstance(a, AuthzExplanation) else {"error": a}
                                            for a in authz]},
                         indent=2))
    else:
        print(render(result, source_id, str(dump.get("version", "")), proxy))
        for line in render_authorization(authz):
            print(line)
    return 0 if result.route is not None else 1


def _gateway(state: StateDir, name: str) -> tuple[str, str] | None:
    """(node id, admin address) of the mesh's ingress gateway when ``name`` names it, else None."""
    if name not in (GATEWAY_NAME, gateway_node("").id):
        return None
    record = state.read_runtime() or {}
    if not record.get("gateway") or not record.get("controlPlane"):
        raise UserError(f"the mesh in {state.root} runs no ingress gateway (it starts with a Gateway resource)")
    # The gateway's admin port listens on the control plane's address (runtime.gateway.start).
    address = str(record["controlPlane"]).rsplit(":", 1)[0]
    return gateway_node(address).id, address


def _read_dump(address: str) -> dict[str, Any]:
    admin = f"http://{address}:{ADMIN_PORT}/config_dump"
    with urllib.request.urlopen(admin, timeout=5) as response:
        return dict(json.load(response))


def authorization(state: StateDir, result: Explanation, source: Instance | str, principal: str,
                  headers: dict[str, str]) -> list[AuthzExplanation | str]:
    """For each destination cluster of the chosen route, the first endpoint that is a mesh instance: its
    sidecar's decision (or why it could not be asked). ``source``: the calling instance, or the address of
    the proxy that calls (the ingress gateway)."""
    from kizuna.proxyconfig.security import SecurityPolicy

    record = state.read_runtime() or {}
    instances = {i.mesh_address: i for i in (Instance.from_json(d) for d in record.get("instances", []))}
    # The address the destination sees (source.ip): in transparent mode the source pod's; in proxy mode the
    # sidecar's unbound socket to a 127/8 address leaves from 127.0.0.1 (the kernel's loopback source).
    pod_address = source.pod_address if isinstance(source, Instance) else source
    source_ip = pod_address if record.get("mode") == "transparent" else "127.0.0.1"
    out: list[AuthzExplanation | str] = []
    for _, cluster, _name in result.clusters:
        if cluster is None:
            continue
        endpoint = next((e for e in cluster.endpoints if e.address in instances), None)
        if endpoint is None:
            continue  # outside the mesh (a ServiceEntry host): no sidecar decides
        target = instances[endpoint.address]
        try:
            dump = _read_dump(target.mesh_address)
        except (OSError, urllib.error.URLError, ValueError) as exc:
            out.append(f"{target.id}: cannot read its sidecar's config: {exc}")
            continue
        security = (dump.get("snapshot") or {}).get("security")
        policy = SecurityPolicy.from_json(security) if security else None
        # Auto mTLS: the hop is mutual TLS when the source sidecar has a certificate and the cluster names the
        # endpoint's identity; then the destination sees the source's SPIFFE ID as the principal.
        peer = principal if endpoint.identity else ""
        out.append(explain_authorization(policy, target.id, endpoint.port, result.method, result.path,
                                         headers, source_ip, peer))
    return out


def render_authorization(found: list[AuthzExplanation | str]) -> list[str]:
    """The authorization part of the text explanation."""
    lines = []
    for a in found:
        if isinstance(a, str):
            lines.append(f"authz        {a}")
            continue
        lines.append(f"authz        at {a.destination}:{a.port} (mTLS {a.mode_text()}, principal "
                     f"{'spiffe://' + a.principal if a.principal else 'none: plaintext'}, source.ip {a.source_ip})")
        for v in a.verdicts:
            matched = f"rule {v.rule} matches" if v.rule is not None else "no rule matches"
            lines.append(f"  {v.action:<10} {v.name}{' (dry-run)' if v.dry_run else ''}: {matched}")
        if a.jwt_rules:
            lines.append(f"  JWT        {', '.join(a.jwt_rules)} (tokens are not verified by explain)")
        lines.append(f"  decision   {a.reason()}")
    return lines


def _ejections(address: str) -> dict[str, frozenset[str]]:
    """The sidecar's live outlier ejections by cluster (from its ``/stats``; empty when unreadable)."""
    try:
        with urllib.request.urlopen(f"http://{address}:{ADMIN_PORT}/stats", timeout=5) as response:
            stats = json.load(response)
    except (OSError, urllib.error.URLError, ValueError):
        return {}
    return {name: frozenset(entry.get("outlier_detection", {}).get("ejected", ()))
            for name, entry in stats.get("resilience", {}).items()}


def render(result: Explanation, source: str, version: str, proxy: str = "sidecar") -> str:
    """The explanation as a few aligned lines (``proxy``: ``sidecar``, or ``proxy`` for the gateway)."""
    lines = [f"request      {result.method} {result.host}:{result.port}{result.path}",
             f"from         {source} ({proxy} config {version or 'none'})"]
    if result.virtual_host is None:
        where = " (a Gateway-bound VirtualService host on this listener)" if proxy != "sidecar" else ""
        lines.append(f"service      none: no service answers to {result.host}:{result.port}{where} "
                     "-> 404 no route (NR)")
        return "\n".join(lines)
    lines.append(f"service      {result.virtual_host}")
    lines.append("routes       (in order; the first that matches wins)")
    for verdict in result.routes:
        origin = f"  [{verdict.source}]" if verdict.source else ""
        if verdict.matched:
            lines.append(f"  matched    {verdict.name}{origin}")
        else:
            lines.append(f"  skipped    {verdict.name}{origin}: {'; or '.join(verdict.reasons)}")
    route = result.route
    if route is None:
        lines.append("result       no route matches -> 404 no route (NR)")
        return "\n".join(lines)
    action = route.action
    policy = action.policy
    if policy is not None and policy.redirect is not None:
        lines.append(f"result       answered by the sidecar: redirect {json.dumps(policy.redirect.to_json())}")
    if policy is not None and policy.direct_response is not None:
        lines.append(f"result       answered by the sidecar: {json.dumps(policy.direct_response.to_json())}")
    for weight, cluster, name in result.clusters:
        if cluster is None:
            lines.append(f"destination  {weight:>3}%  {name}: not in the config -> 503 (NC)")
            continue
        endpoints = ", ".join(
            f"{e.address}:{e.port} ({e.workload}"
            + (", ejected by outlier detection)" if result.health(name, e.address, e.port) == "ejected" else ")")
            for e in cluster.endpoints) or (
            f"none, no DestinationRule defines subset {cluster.subset} -> 503 cluster not found (NC)"
            if cluster.undefined_subset else "none -> 503 no healthy upstream (UH)")
        lines.append(f"destination  {weight:>3}%  {name}")
        lines.append(f"               load balancer {cluster.lb_policy}, connect timeout {cluster.connect_timeout:g}s;"
                     f" endpoints: {endpoints}")
        extra = {k: v for k, v in cluster.to_json().items()
                 if k in ("connectionPool", "outlierDetection", "hashPolicy")}
        if extra:
            lines.append(f"               {json.dumps(extra)}")
    retry = action.retry
    retries = (f"{retry.attempts} on {','.join(sorted(retry.retry_on))}"
               + (f" (status {','.join(map(str, sorted(retry.retriable_status_codes)))})"
                  if "retriable-status-codes" in retry.retry_on else "")
               + (f", {retry.per_try_timeout:g}s per try" if retry.per_try_timeout else "")
               if retry.attempts else "none")
    lines.append(f"timeout      {f'{action.timeout:g}s' if action.timeout else 'none (Istio default)'}")
    lines.append(f"retries      {retries}")
    if policy is not None:
        shown = {k: v for k, v in policy.to_json().items() if k not in ("redirect", "directResponse")}
        if shown:
            lines.append(f"actions      {json.dumps(shown)}")
    return "\n".join(lines)
