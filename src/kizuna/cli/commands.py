"""The ``kizuna`` subcommands: each turns parsed arguments into one call to the runtime, the control plane
client or the api layer, and prints the answer. No logic of their own beyond formatting."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from kizuna.cli.options import settings_from
from kizuna.runtime.settings import (
    ControlPlaneSettings,
    DownSettings,
    ProxySettings,
    ScaleSettings,
    StateSettings,
    UpSettings,
)
from kizuna.runtime.state import StateDir


def _state(args: argparse.Namespace) -> StateDir:
    return StateDir(settings_from(StateSettings, args).resolved())


def _client(args: argparse.Namespace) -> Any:
    from kizuna.controlplane.client import ControlPlaneClient

    return ControlPlaneClient.from_state_dir(_state(args).root)


def up(args: argparse.Namespace) -> int:
    """``kizuna up PATH...``."""
    from kizuna.runtime.up import up as run_up

    return run_up(settings_from(UpSettings, args), _state(args))


def down(args: argparse.Namespace) -> int:
    """``kizuna down``: exit 0 when the mesh stopped and also when nothing was running (says so)."""
    from kizuna.runtime.down import down as run_down

    print(run_down(_state(args), settings_from(DownSettings, args).stop_grace))
    return 0


def scale(args: argparse.Namespace) -> int:
    """``kizuna scale DEPLOYMENT --replicas N``: prints what started or stopped."""
    from kizuna.runtime.scale import scale as run_scale

    settings = settings_from(ScaleSettings, args)
    print(run_scale(_state(args), settings.deployment, settings.replicas, settings.namespace,
                    grace=settings.stop_grace, ready_timeout=settings.ready_timeout))
    return 0


def _print_results(results: list[dict[str, Any]], suffix: str = "") -> None:
    for r in results:
        print(f"{r['kind'].lower()}/{r['name']} ({r['namespace']}) {r['action']}{suffix}")


def apply(args: argparse.Namespace) -> int:
    """``kizuna apply -f PATH [-n NS]``: validated locally first (same errors, no round trip), then applied
    atomically."""
    from kizuna.cli.namespace import with_namespace
    from kizuna.runtime.manifests import load

    documents = with_namespace(load(args.filename, args.recursive)[0], args.namespace)
    client = _client(args)
    _print_results(client.apply(documents, dry_run=args.dry_run), " (dry run)" if args.dry_run else "")
    if not args.dry_run:
        _refresh_names(args, client)
    return 0


def _refresh_names(args: argparse.Namespace, client: Any) -> None:
    """Transparent mode: Service names and sidecar-less pods' VIP rules follow every apply and delete."""
    from kizuna.runtime.transparent import refresh

    refresh(_state(args), client)


def delete(args: argparse.Namespace) -> int:
    """``kizuna delete -f PATH [-n NS]``."""
    from kizuna.api import load_documents
    from kizuna.cli.namespace import with_namespace
    from kizuna.runtime.manifests import manifest_paths

    # Deleting needs only kind and name: a manifest that no longer validates can still be deleted.
    documents = with_namespace(load_documents(manifest_paths(args.filename, args.recursive)), args.namespace)
    client = _client(args)
    _print_results(client.delete(documents))
    _refresh_names(args, client)
    return 0


def validate(args: argparse.Namespace) -> int:
    """``kizuna validate -f PATH``: offline; every problem on its own line with file, resource and field."""
    from kizuna.runtime.manifests import load

    _, resources = load(args.filename, args.recursive, unique=False)
    files = sorted({r.source for r in resources})
    print(f"{len(resources)} resource{'s' if len(resources) != 1 else ''} in {len(files)} "
          f"file{'s' if len(files) != 1 else ''}: valid")
    return 0


def get(args: argparse.Namespace) -> int:
    """``kizuna get KIND [NAME]``: a table, or whole resources with ``-o yaml|json``."""
    from kizuna.api import SUPPORTED_KINDS, dump_json, dump_yaml
    from kizuna.cli.kinds import resolve_kind
    from kizuna.runtime.display import table
    from kizuna.runtime.errors import UserError

    kind = resolve_kind(args.kind, SUPPORTED_KINDS)
    items = _client(args).get(kind, args.name, args.namespace)
    if args.name and not items:
        where = f"{args.namespace}/" if args.namespace else ""
        raise UserError(f"{kind} {where}{args.name} not found")
    if args.output == "yaml":
        sys.stdout.write(dump_yaml(items[0] if args.name and len(items) == 1 else items))
    elif args.output == "json":
        sys.stdout.write(dump_json(items[0] if args.name and len(items) == 1 else items))
    elif not items:
        print(f"no {kind} resources" + (f" in namespace {args.namespace}" if args.namespace else ""))
    else:
        rows = [["NAMESPACE", "NAME", "KIND"] + (["CLUSTER-IP", "PORTS"] if kind == "Service" else [])]
        for i in items:
            row = [i.get("metadata", {}).get("namespace", "default"), i.get("metadata", {}).get("name", "?"),
                   str(i.get("kind", kind))]
            if kind == "Service":  # as kubectl shows them: the VIP (transparent mode) and the ports
                spec = i.get("spec", {})
                ports = ",".join(f"{p.get('port')}/{p.get('protocol', 'TCP')}" for p in spec.get("ports", []))
                row += [str(spec.get("clusterIP") or "-"), ports or "-"]
            rows.append(row)
        sys.stdout.write(table(rows))
    return 0


def status(args: argparse.Namespace) -> int:
    """``kizuna status``: the control plane's config version and every sidecar it knows; then each proxy's
    workload identity, certificate expiry and the security policies that select it (read from the proxies'
    own admin ``/config_dump``), and where the ingress gateway listens."""
    from kizuna.runtime.display import deployment_rows, gateway_urls, security_rows, table

    state = _state(args)
    answer = _client(args).status()
    print(f"control plane: config version {answer.get('version', '?')}")
    proxies = answer.get("proxies", [])
    if not proxies:
        print("no sidecars have connected")
        return 0
    rows = [["PROXY", "WORKLOAD", "CONNECTED", "READY", "SYNCED", "VERSION", "PROBLEM"]]
    for p in proxies:
        problem = p.get("error") or (f"rejected: {p['nack']}" if p.get("nack") else "")
        rows.append([str(p.get("id")), str(p.get("workload")), _yes(p.get("connected")), _yes(p.get("ready")),
                     _yes(p.get("synced")), str(p.get("ackedVersion") or "-"), problem or "-"])
    sys.stdout.write(table(rows))
    runtime = state.read_runtime() or {}
    counts = deployment_rows(runtime.get("instances", []), proxies)
    if len(counts) > 1:  # as `kubectl get deployments`: READY is ready/replicas (`kizuna scale` changes them)
        print("deployments:")
        sys.stdout.write(table(counts))
    admins = _admin_addresses(runtime)
    ids = [str(p.get("id")) for p in proxies if p.get("connected")]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=8) as pool:  # an unreachable admin port costs its timeout once
        found = list(pool.map(lambda i: _config_dump(admins[i]) if i in admins else None, ids))
    dumps = list(zip(ids, found, strict=True))
    # No blank lines, and no later row starting with a proxy id: scripts read the first table line by line.
    if dumps:
        print("workload security:")
        sys.stdout.write(table(security_rows(dumps)))
    remote = [i for i, dump in dumps if dump is not None and _jwks_uris(dump)]
    with ThreadPoolExecutor(max_workers=8) as pool:  # only proxies with a jwksUri: their /stats says how it goes
        stats = list(pool.map(lambda i: _config_dump(admins[i], "/stats"), remote))
    for proxy_id, found_stats in zip(remote, stats, strict=True):
        for line in jwks_failures(proxy_id, found_stats):
            print(line)
    urls = gateway_urls(runtime.get("gateway"))
    if urls and any(str(p.get("id", "")).startswith("istio-ingressgateway") for p in proxies):
        print(f"ingress gateway  {urls}")
    if runtime.get("prometheus"):
        print(f"prometheus       http://{runtime['prometheus']}")
    board = (state.read_controlplane() or {}).get("dashboard")
    if board:
        print(f"dashboard        {board}")
    endpoint, sampling = state.tracing()
    if endpoint:
        print(f"traces           {endpoint} ({sampling:g}% of new traces sampled)")
    return 0


def _admin_addresses(runtime: dict[str, Any]) -> dict[str, str]:
    """Proxy id → its admin ``host:port``: sidecars on their mesh address, the gateway on the control
    plane's address (``runtime.json``)."""
    from kizuna.proxyconfig.bootstrap import ADMIN_PORT
    from kizuna.runtime import gateway
    from kizuna.runtime.workloads import Instance

    found = {}
    for data in runtime.get("instances", []):
        instance = Instance.from_json(data)
        found[instance.id] = f"{instance.mesh_address}:{ADMIN_PORT}"
    control_plane = str(runtime.get("controlPlane") or "")
    if runtime.get("gateway") and control_plane:
        found[gateway.node("").id] = f"{control_plane.rpartition(':')[0]}:{ADMIN_PORT}"
    return found


def _jwks_uris(dump: dict[str, Any]) -> list[str]:
    security = (dump.get("snapshot") or {}).get("security") or {}
    return [str(r["jwksUri"]) for r in security.get("jwtRules", ()) if r.get("jwksUri") and not r.get("jwks")]


def jwks_failures(proxy_id: str, stats: dict[str, Any] | None) -> list[str]:
    """``kizuna status``'s lines for the key sets a proxy cannot fetch (its ``/stats`` ``jwks``): one per
    failing ``jwksUri``, starting ``jwks failing`` (never with a proxy id: scripts key the first table by it)."""
    lines = []
    for uri, entry in sorted(((stats or {}).get("jwks") or {}).items()):
        if entry.get("last_error"):
            lines.append(f"jwks failing  {uri} for {proxy_id}: {entry['last_error']} "
                         f"({entry.get('failures', 0)} failed fetches; tokens it signs get 401)")
    return lines


def _config_dump(admin: str, path: str = "/config_dump") -> dict[str, Any] | None:
    """A proxy's admin ``/config_dump`` (or another JSON ``path``), or None when it does not answer."""
    import json
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://{admin}{path}", timeout=3) as response:
            return dict(json.load(response))
    except (OSError, urllib.error.URLError, ValueError):
        return None


def _yes(value: Any) -> str:
    return "-" if value is None else ("yes" if value else "no")


def exec_(args: argparse.Namespace) -> int:
    """``kizuna exec WORKLOAD -- CMD...``."""
    from kizuna.runtime.exec import exec_in

    return exec_in(_state(args), args.workload, list(args.argv), args.namespace)


def explain(args: argparse.Namespace) -> int:
    """``kizuna explain --from WORKLOAD URL``; exit 1 when no route would take the request."""
    from kizuna.cli.explain import run

    return run(_state(args), args)


def traces(args: argparse.Namespace) -> int:
    """``kizuna traces [TRACE_ID]``: the control plane's recent traces, or one as an indented waterfall."""
    answer = _client(args).traces(args.trace_id)
    if args.output == "json":
        print(json.dumps(answer, indent=2))
        return 0
    if not args.trace_id:
        for t in answer.get("traces", []):
            mark = " ERROR" if t["error"] else ""
            print(f"{t['traceId']}  {t['durationMs']:>9.2f} ms  {t['spans']:>3} spans  {t['root']}{mark}")
        return 0
    spans = answer["spans"]
    children: dict[str, list[dict[str, Any]]] = {}
    ids = {s["spanId"] for s in spans}
    for span in spans:
        children.setdefault(span["parentSpanId"] if span["parentSpanId"] in ids else "", []).append(span)
    start = min(s["start"] for s in spans)

    def show(span: dict[str, Any], depth: int) -> None:
        offset, took = (span["start"] - start) / 1e6, (span["end"] - span["start"]) / 1e6
        status = span["attributes"].get("http.status_code", "")
        print(f"{offset:>9.2f} ms {took:>9.2f} ms  {'  ' * depth}{span['service']} {span['kind']} "
              f"{span['name']} {status}")
        for child in children.get(span["spanId"], []):
            show(child, depth + 1)

    for root in children.get("", []):
        show(root, 0)
    return 0


def rotate_root(args: argparse.Namespace) -> int:
    """``kizuna rotate-root [--grace SECONDS]``: start a root rotation in the running mesh."""
    import time

    answer = _client(args).rotate_root(args.grace)
    wait = max(float(answer["switchAt"]) - time.time(), 0.0)
    print(f"new root trusted now ({answer['roots']} roots in the trust bundle); it signs in {wait:.0f}s")
    return 0


def controlplane(args: argparse.Namespace) -> int:
    """``kizuna controlplane``: run the control plane in the foreground."""
    from kizuna.controlplane.main import run

    state = _state(args)
    listen = settings_from(ControlPlaneSettings, args).listen
    if listen is None:
        # Sidecars dial the address in their bootstrap: a restarted control plane must come back on it.
        recorded = (state.read_runtime() or {}).get("controlPlane")
        previous = (state.read_controlplane() or {}).get("address")
        listen = str(recorded or previous or "127.0.0.1:0")
    settings = settings_from(ControlPlaneSettings, args)
    service_cidr = settings.service_cidr or (state.read_runtime() or {}).get("serviceCidr")
    return run(str(state.root), listen, service_cidr=service_cidr or None,
               workload_cert_ttl=settings.workload_cert_ttl,
               cacerts=str(settings.cacerts) if settings.cacerts else (state.read_runtime() or {}).get("cacerts"),
               trust_domain=settings.trust_domain or (state.read_runtime() or {}).get("trustDomain") or "cluster.local",
               tls=settings.tls or bool((state.read_runtime() or {}).get("controlPlaneTls")),
               dashboard=settings.dashboard or (state.read_runtime() or {}).get("dashboard") or None)


def dashboard(args: argparse.Namespace) -> int:
    """``kizuna dashboard``: print the URL of the running mesh's dashboard (opens nothing)."""
    from kizuna.runtime.errors import UserError

    state = _state(args)
    running = state.read_controlplane()
    if running is None:
        raise UserError(f"no control plane is running for {state.root}; start the mesh with `kizuna up`")
    url = running.get("dashboard")
    if not url:
        raise UserError("the control plane serves no dashboard (started with --dashboard off, or its port "
                        "was taken: see the control plane's log)")
    print(url)
    return 0


def proxy(args: argparse.Namespace) -> int:
    """``kizuna proxy --bootstrap FILE``: one sidecar, in the foreground."""
    from kizuna.proxy.main import run

    return run(str(settings_from(ProxySettings, args).bootstrap))
