"""The control plane's API: routes of ``docs/architecture.md`` "Control plane API" and the discovery stream.

Every request needs the bearer token. Applied documents are parsed again here, whatever the client checked:
the control plane is the authority on what is valid, and a batch with any invalid document changes nothing
(422 with every error line). The discovery stream starts with the sidecar's Hello; from then on its ACKs,
NACKs and health reports go to the push queue."""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import Callable, Sequence
from typing import Any

from kizuna.api.codec import Document
from kizuna.api.errors import ValidationError
from kizuna.api.validate import parse_all
from kizuna.controlplane.api_tls import write_trust_bundle
from kizuna.controlplane.ca import CaError, CertificateAuthority
from kizuna.controlplane.httpserver import (
    HttpServer,
    Request,
    Response,
    Upgrade,
    error_response,
    json_response,
)
from kizuna.controlplane.push import Connection, PushQueue
from kizuna.controlplane.registry import Registry
from kizuna.controlplane.store import Key, MemoryStore, StoreError
from kizuna.controlplane.token import token_matches
from kizuna.controlplane.traces import TraceStore
from kizuna.controlplane.vips import VipAllocator
from kizuna.proxyconfig.xds import (
    DISCOVERY_PATH,
    MAX_MESSAGE_BYTES,
    UPGRADE_TOKEN,
    Ack,
    Framer,
    Health,
    Hello,
    Message,
    Nack,
    encode,
)

log = logging.getLogger("kizuna.controlplane.server")

HELLO_TIMEOUT = 10.0
"""A discovery stream that has not said Hello by then is closed."""

Parse = Callable[[list[Document]], Sequence[Any]]
"""``kizuna.api`` ``parse_all``: documents to resources, raising ValidationError."""


class _StreamSink:
    """The push queue's handle on one discovery stream."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer

    def send(self, message: Message) -> None:
        if self._writer.is_closing():
            return
        # A proxy that stops reading must not make the control plane buffer pushes without bound.
        if self._writer.transport.get_write_buffer_size() > MAX_MESSAGE_BYTES:
            log.warning("discovery stream not draining; closing it")
            self._writer.close()
            return
        self._writer.write(encode(message))

    def close(self) -> None:
        self._writer.close()


class ControlPlaneServer:
    """The HTTP API and discovery endpoint over one store, registry and push queue."""

    def __init__(self, token: str, store: MemoryStore[Any], registry: Registry, pusher: PushQueue,
                 parse: Parse = parse_all, vips: VipAllocator | None = None,
                 ca: CertificateAuthority | None = None) -> None:
        self.token = token
        self.ca = ca
        """Signs workload certificates (``POST /v1/certificates``); None: no CA, the endpoint answers 404."""
        self.traces = TraceStore()
        """Spans the sidecars export (``traces.OtlpReceiver`` fills it)."""
        self.tls: ssl.SSLContext | None = None
        self.state_dir: str | None = None
        """With TLS: the listener's context and the state dir (a root rotation updates both trust stores)."""
        self.vips = vips
        """Allocates Service clusterIPs (transparent mode); None leaves Services without VIPs."""
        self.store = store
        self.registry = registry
        self.pusher = pusher
        self._parse = parse
        self._http = HttpServer(self.handle)
        self._routes: dict[tuple[str, str], Callable[[Request], Response | Upgrade]] = {
            ("POST", "/v1/apply"): self._apply,
            ("POST", "/v1/delete"): self._delete,
            ("GET", "/v1/resources"): self._resources,
            ("GET", "/v1/status"): lambda _: json_response(200, self.pusher.status()),
            ("GET", "/v1/registry"): self._registry,
            ("POST", "/v1/certificates"): self._certificates,
            ("GET", "/v1/roots"): self._roots,
            ("POST", "/v1/ca/rotate"): self._rotate,
            ("GET", "/v1/traces"): self._traces,
            ("GET", DISCOVERY_PATH): self._discovery,
        }

    async def start(self, host: str, port: int, tls: ssl.SSLContext | None = None) -> tuple[str, int]:
        """Listen on ``host:port`` (over TLS with ``tls``); returns the bound address."""
        self.tls = tls
        return await self._http.start(host, port, tls)

    async def close(self) -> None:
        self.pusher.close()
        await self._http.close()

    async def handle(self, request: Request) -> Response | Upgrade:
        """Authenticate, then route."""
        if not token_matches(self.token, request.headers.get("authorization")):
            return Response(401, b'{"errors":["missing or wrong bearer token (see <state dir>/token)"]}\n',
                            headers=(("WWW-Authenticate", 'Bearer realm="kizuna"'),))
        route = self._routes.get((request.method, request.path))
        if route is None:
            if any(path == request.path for _, path in self._routes):
                return error_response(405, f"{request.method} is not allowed on {request.path}")
            return error_response(404, f"no such endpoint: {request.path}")
        return route(request)

    # -- config --------------------------------------------------------------------------------------------

    def _apply(self, request: Request) -> Response:
        body, documents = _documents(request)
        if isinstance(documents, Response):
            return documents
        try:
            resources = list(self._parse(documents))
            if self.vips is not None:
                # The handler runs on the loop thread, so nothing else applies between this and the store.
                resources = self.vips.assign(resources, [*self.store.list(kind="Service"),
                                                          *self.store.list(kind="ServiceEntry")])
        except ValidationError as exc:
            return error_response(422, *exc.errors)
        if body.get("dryRun"):
            results = self.store.plan(resources)
        else:
            try:
                results = self.store.apply(resources)
            except StoreError as exc:
                return error_response(500, str(exc))
        return json_response(200, {"results": [r.to_json() for r in results]})

    # -- identity ------------------------------------------------------------------------------------------

    def _certificates(self, request: Request) -> Response:
        """``{"csr", "namespace", "serviceAccount", "credential", "ttl"?}`` → the signed certificate, its chain
        and the trust bundle; 403 when the credential does not grant that identity."""
        if self.ca is None:
            return error_response(404, "this control plane runs no certificate authority")
        try:
            body = json.loads(request.body or b"{}")
            csr, namespace = str(body["csr"]), str(body["namespace"])
            account, credential = str(body["serviceAccount"]), str(body["credential"])
            ttl = float(body["ttl"]) if body.get("ttl") is not None else None
        except (ValueError, KeyError, TypeError) as exc:
            return error_response(400, f"expected csr, namespace, serviceAccount and credential: {exc}")
        try:
            issued = self.ca.sign(csr, namespace, account, credential, ttl)
        except CaError as exc:
            log.warning("refused a certificate for %s/%s: %s", namespace, account, exc)
            return error_response(403, str(exc))
        return json_response(200, issued.to_json())

    def _identity_mismatch(self, hello: Hello, peercert: dict[str, Any] | None) -> str:
        """A sidecar that presents its workload certificate may only speak for a node of that identity (its
        namespace and service account); without a certificate (not obtained yet) the token alone admits it."""
        uris = [str(v) for k, v in (peercert or {}).get("subjectAltName", ()) if k == "URI"]
        if not uris or self.ca is None:
            return ""
        node = hello.node
        wanted = f"spiffe://{self.ca.trust_domain}/ns/{node.namespace}/sa/{node.service_account}"
        return "" if wanted in uris else f"its certificate is {uris[0]}, not {wanted}"

    def _rotate(self, request: Request) -> Response:
        """``{"grace": seconds}``: start a root rotation (see ``CertificateAuthority.rotate_root``)."""
        if self.ca is None:
            return error_response(404, "this control plane runs no certificate authority")
        try:
            body = json.loads(request.body or b"{}")
            grace = float(body.get("grace", self.ca.workload_ttl))
        except (ValueError, TypeError, AttributeError) as exc:
            return error_response(400, f"expected {{\"grace\": seconds}}: {exc}")
        if grace < 0:
            return error_response(400, "grace must not be negative")
        try:
            switch_at = self.ca.rotate_root(grace)
        except CaError as exc:
            return error_response(409, str(exc))
        if self.tls is not None:
            # Sidecars renewed under the new root present certificates this listener must accept too.
            self.tls.load_verify_locations(cadata=self.ca.roots_pem())
            if self.state_dir is not None:
                write_trust_bundle(self.ca, self.state_dir)
        log.info("root rotation started: the new root signs from %.0f (in %.0fs)", switch_at, grace)
        return json_response(200, {"switchAt": switch_at, "roots": len(self.ca.roots)})

    def _traces(self, request: Request) -> Response:
        """Recent traces (``?limit=N``), or one trace's spans (``?id=<trace id>``)."""
        trace_id = request.param("id")
        if trace_id:
            spans = self.traces.trace(trace_id)
            if spans is None:
                return error_response(404, f"no trace {trace_id} (only the last {self.traces.max_traces} are kept)")
            return json_response(200, {"traceId": trace_id, "spans": spans})
        try:
            limit = int(request.param("limit") or 50)
        except ValueError:
            return error_response(400, "limit must be a number")
        return json_response(200, {"traces": self.traces.summaries(limit), "received": self.traces.received})

    def _roots(self, _: Request) -> Response:
        if self.ca is None:
            return error_response(404, "this control plane runs no certificate authority")
        return json_response(200, {"roots": self.ca.roots_pem(), "trustDomain": self.ca.trust_domain})

    def _delete(self, request: Request) -> Response:
        _, documents = _documents(request)
        if isinstance(documents, Response):
            return documents
        keys: list[Key] = []
        errors: list[str] = []
        for doc in documents:
            meta = doc.raw.get("metadata")
            kind, name = doc.raw.get("kind"), meta.get("name") if isinstance(meta, dict) else None
            if not isinstance(kind, str) or not kind or not isinstance(name, str) or not name:
                errors.append(f"{doc.source}: document {doc.index + 1}: kind and metadata.name are required")
                continue
            namespace = meta.get("namespace") if isinstance(meta, dict) else None
            keys.append(self._stored_key(kind, str(namespace or "default"), name))
        if errors:
            return error_response(422, *errors)
        try:
            results = self.store.delete(keys)
        except StoreError as exc:
            return error_response(500, str(exc))
        return json_response(200, {"results": [r.to_json() for r in results]})

    def _stored_key(self, kind: str, namespace: str, name: str) -> Key:
        """Match the kind case-insensitively (``virtualservice`` deletes a ``VirtualService``)."""
        for resource in self.store.list(kind=kind, namespace=namespace, name=name):
            key: Key = resource.key
            return key
        return (kind, namespace, name)

    def _resources(self, request: Request) -> Response:
        found = self.store.list(request.param("kind"), request.param("namespace"), request.param("name"))
        # manifest(): as applied, with the namespace filled in (applied without one means "default").
        return json_response(200, {"items": [resource.manifest() for resource in found]})

    def _registry(self, request: Request) -> Response:
        services = [r.manifest() for r in self.store.list(kind="Service")]
        return json_response(200, self.registry.describe(services))

    # -- discovery -----------------------------------------------------------------------------------------

    def _discovery(self, request: Request) -> Response | Upgrade:
        wanted = request.headers.get("upgrade", "")
        if wanted and wanted.lower() != UPGRADE_TOKEN:
            return error_response(400, f"unsupported upgrade {wanted!r}; use {UPGRADE_TOKEN}")
        return Upgrade(UPGRADE_TOKEN, self._stream)

    async def _stream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      initial: bytes) -> None:
        framer = Framer()
        try:
            pending = framer.feed(initial)
            while not pending:
                data = await asyncio.wait_for(reader.read(65536), HELLO_TIMEOUT)
                if not data:
                    return
                pending = framer.feed(data)
        except (ValueError, TimeoutError) as exc:
            log.warning("discovery stream closed before Hello: %s", exc)
            return
        hello = pending.pop(0)
        if not isinstance(hello, Hello):
            log.warning("discovery stream must start with Hello, got %s", type(hello).__name__)
            return
        refused = self._identity_mismatch(hello, writer.get_extra_info("peercert"))
        if refused:
            log.warning("discovery stream of %s refused: %s", hello.node.id, refused)
            return
        connection = self.pusher.connect(hello.node, hello.version, hello.ready, _StreamSink(writer))
        try:
            while True:
                for message in pending:
                    self._dispatch(connection, message)
                data = await reader.read(65536)
                if not data:
                    return
                pending = framer.feed(data)
        except ValueError as exc:
            log.warning("closing the discovery stream of %s: %s", hello.node.id, exc)
        finally:
            self.pusher.disconnect(connection)

    def _dispatch(self, connection: Connection, message: Message) -> None:
        if isinstance(message, Ack):
            self.pusher.ack(connection, message)
        elif isinstance(message, Nack):
            self.pusher.nack(connection, message)
        elif isinstance(message, Health):
            self.pusher.health(connection, message.ready)
        else:
            log.warning("unexpected %s from %s", type(message).__name__, connection.node.id)


def _documents(request: Request) -> tuple[dict[str, Any], list[Document] | Response]:
    """The ``{"documents": [{"source", "index", "resource"}]}`` body of apply and delete."""
    try:
        body = json.loads(request.body or b"{}")
    except ValueError as exc:
        return {}, error_response(400, f"request body is not JSON: {exc}")
    if not isinstance(body, dict) or not isinstance(body.get("documents"), list):
        return {}, error_response(400, 'request body must be {"documents": [...]}')
    documents = []
    for position, item in enumerate(body["documents"]):
        if not isinstance(item, dict) or not isinstance(item.get("resource"), dict):
            return {}, error_response(400, f"documents[{position}]: needs a resource mapping")
        index = item.get("index", position)
        documents.append(Document(str(item.get("source") or "<request>"),
                                  index if isinstance(index, int) else position, item["resource"]))
    return body, documents
