"""The ingress gateway ``kizuna up`` runs: Istio's ``istio-ingressgateway`` workload, as one proxy process.

The rule: with ``--gateway auto`` (the default) the gateway runs when the manifests given to ``up`` hold a
Gateway; ``--gateway on`` always runs it (Gateways applied later with ``kizuna apply`` are then served at
once, since its listeners follow its config), ``--gateway off`` never. A Gateway applied later to a mesh that
started without one is stored and compiled, but nothing serves it until the next ``up``.

The workload is what Istio's installation creates: namespace ``istio-system``, labels
``istio: ingressgateway`` and ``app: istio-ingressgateway``, service account ``istio-ingressgateway``, so
Istio's Gateways (``selector: {istio: ingressgateway}``) select it unchanged. It runs ``kizuna proxy`` in
gateway mode on the host (in transparent mode too: the host reaches every pod address over the mesh's
bridge, and each pod's capture rules take the connection to its sidecar), its admin port on the control
plane's address. Istio's ingress Service maps port 80 to the pod's 8080 and 443 to 8443; here 8080 binds
``--gateway-port`` and 8443 ``--gateway-https-port`` on ``--gateway-address``, and any other server port
(e.g. 31400 for TCP) binds as itself.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from kizuna.proxyconfig.bootstrap import Bootstrap, Node
from kizuna.runtime import identities
from kizuna.runtime.errors import UserError
from kizuna.runtime.processes import ProcessRecord, Supervisor
from kizuna.runtime.readiness import not_ready_reason
from kizuna.runtime.settings import UpSettings
from kizuna.runtime.state import StateDir

NAME = "istio-ingressgateway"
NAMESPACE = "istio-system"
LABELS = (("app", "istio-ingressgateway"), ("istio", "ingressgateway"))
HTTP_TARGET_PORT = 8080
"""Where Istio's ingress Service sends port 80 (and 8080): the gateway's HTTP listener."""
HTTPS_TARGET_PORT = 8443
"""Where Istio's ingress Service sends port 443 (and 8443)."""
GATEWAY_MODES = ("auto", "on", "off")
POLL = 0.1


def wanted(settings: UpSettings, resources: Iterable[Any]) -> bool:
    """Does this ``up`` run the gateway? (``--gateway``: auto = when a Gateway is among the manifests.)"""
    if settings.gateway not in GATEWAY_MODES:
        raise UserError(f"--gateway {settings.gateway}: must be one of {', '.join(GATEWAY_MODES)}")
    if settings.gateway == "auto":
        return any(r.kind == "Gateway" for r in resources)
    return settings.gateway == "on"


def node(admin_address: str) -> Node:
    """The gateway workload's identity (``istio-ingressgateway-0.istio-system``), admin at ``admin_address``."""
    return Node(id=f"{NAME}-0.{NAMESPACE}", workload=NAME, namespace=NAMESPACE, service_account=NAME,
                labels=LABELS, pod_address=admin_address, mesh_address=admin_address, kind="gateway")


def bootstrap(settings: UpSettings, state: StateDir, admin_address: str, listen: str) -> Bootstrap:
    """The gateway proxy's bootstrap: its node, control plane, access log, and where its listeners bind."""
    gateway = node(admin_address)
    # The credential goes to a file of the gateway's own; the bootstrap only names it (runtime.identities).
    secret = identities.write_credential(identities.credential_path(state, gateway.id),
                                         identities.credential(state, NAMESPACE, NAME))
    return Bootstrap(node=gateway, control_plane=listen, token_file=str(state.token),
                     access_log=str(state.logs / f"{gateway.id}.access.log"),
                     credential_file=str(secret), trust_domain=identities.trust_domain(state),
                     control_plane_ca=str(bundle) if (bundle := state.control_plane_ca()) else None,
                     trace_endpoint=state.tracing()[0], trace_sampling=state.tracing()[1],
                     gateway_address=settings.gateway_address,
                     gateway_ports=((HTTP_TARGET_PORT, settings.gateway_port),
                                    (HTTPS_TARGET_PORT, settings.gateway_https_port)))


def start(supervisor: Supervisor, state: StateDir, settings: UpSettings, admin_address: str,
          listen: str, env: Mapping[str, str]) -> ProcessRecord:
    """Write the bootstrap and start the gateway proxy (in the host's network namespace)."""
    config = bootstrap(settings, state, admin_address, listen)
    path = state.bootstrap(config.node.id)
    config.dump(path)
    return supervisor.spawn(f"{config.node.id}.proxy", "gateway",
                            [sys.executable, "-m", "kizuna", "proxy", "--bootstrap", str(path)],
                            env=env, cwd=state.root)


def wait_ready(client: Any, supervisor: Supervisor, state: StateDir, timeout: float,
               fail_if_exited: Callable[[Supervisor], None]) -> None:
    """Until the gateway runs the current config (its listeners are bound); UserError after ``timeout``."""
    gateway_id = node("").id
    deadline = time.monotonic() + timeout
    while True:
        fail_if_exited(supervisor)
        proxies = {p["id"]: p for p in client.status().get("proxies", [])}
        proxy = proxies.get(gateway_id)
        why = not_ready_reason(proxy, "the ingress gateway", app=False)
        if why is None:
            return
        if proxy is not None and proxy.get("nack") and proxy.get("connected"):
            # A refused config (a port it cannot bind, mostly) will not fix itself: say so now.
            raise UserError(f"{why}; see {state.log(gateway_id + '.proxy')}")
        if time.monotonic() >= deadline:
            raise UserError(f"the ingress gateway did not become ready within {timeout:g}s: {why}; see "
                            f"{state.log(gateway_id + '.proxy')}")
        time.sleep(POLL)


def urls(settings: UpSettings) -> str:
    """Where users reach the gateway: ``http://127.0.0.1:8080/`` (HTTP servers on 80 and 8080) and
    ``https://127.0.0.1:8443/`` (HTTPS and TLS servers on 443 and 8443)."""
    return (f"http://{settings.gateway_address}:{settings.gateway_port}/ (Gateway servers on ports 80 and 8080), "
            f"https://{settings.gateway_address}:{settings.gateway_https_port}/ (443 and 8443)")
