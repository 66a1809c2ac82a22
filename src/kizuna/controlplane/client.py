"""A small synchronous client of the control plane API, for the CLI and the local runtime.

It finds the mesh through the state dir (``controlplane.json``, ``token`` and the trust bundle), speaks HTTP/1.1
over TLS (plain HTTP to an in-process control plane) with ``http.client``, checks the server is the control
plane, and turns every non-2xx answer into ``ApiError`` carrying the server's error lines.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from kizuna.controlplane.files import read_address_file
from kizuna.controlplane.token import read_token, token_path
from kizuna.proxyconfig.controlplane_tls import TRUST_BUNDLE, check_control_plane, client_context

DEFAULT_TIMEOUT = 30.0


class ApiError(Exception):
    """The control plane answered 4xx/5xx; ``errors`` are its lines (validation errors name the field)."""

    def __init__(self, status: int, errors: list[str]) -> None:
        self.status = status
        self.errors = errors
        super().__init__("\n".join(errors) or f"control plane answered {status}")


class NoMeshError(ApiError):
    """No control plane is running (or reachable) for this state dir (``status`` 0: no answer at all)."""

    def __init__(self, state_dir: str | Path, detail: str = "") -> None:
        self.state_dir = str(state_dir)
        message = f"no mesh is running in {state_dir} (start one with kizuna up)"
        super().__init__(0, [f"{message}: {detail}" if detail else message])


def _document_json(document: Any) -> dict[str, Any]:
    """``kizuna.api.codec.Document`` (or a bare resource mapping) as the API's document shape."""
    if isinstance(document, dict):
        return {"source": "<client>", "index": 0, "resource": document}
    return {"source": document.source, "index": document.index, "resource": document.raw}


class ControlPlaneClient:
    """Talks to one control plane. Each call opens a connection: calls are rare and the server is local."""

    def __init__(self, address: str, token: str, state_dir: str | Path = "",
                 timeout: float = DEFAULT_TIMEOUT, tls: ssl.SSLContext | None = None) -> None:
        host, _, port = address.rpartition(":")
        self.host = host.strip("[]")
        self.port = int(port)
        self.token = token
        self.state_dir = str(state_dir)
        self.timeout = timeout
        self.tls = tls
        """Verifies the control plane's certificate (None: plain HTTP, an in-process control plane)."""
        self.trust_domain = "cluster.local"
        """The mesh's trust domain: the control plane's certificate must be ``istiod``'s in it."""

    @classmethod
    def from_state_dir(cls, state_dir: str | Path, timeout: float = DEFAULT_TIMEOUT) -> ControlPlaneClient:
        """The client of the mesh running in ``state_dir``; raises NoMeshError when there is none."""
        data = read_address_file(state_dir)
        if data is None:
            raise NoMeshError(state_dir)
        try:
            token = read_token(token_path(state_dir))
        except OSError as exc:
            raise NoMeshError(state_dir, f"cannot read the token: {exc}") from exc
        tls = None
        if data.get("tls"):
            try:
                tls = client_context(str(Path(state_dir) / TRUST_BUNDLE))
            except (OSError, ssl.SSLError) as exc:
                raise NoMeshError(state_dir, f"cannot read the mesh's trust bundle: {exc}") from exc
        client = cls(str(data["address"]), token, state_dir, timeout, tls)
        client.trust_domain = str(data.get("trustDomain") or client.trust_domain)
        return client

    def apply(self, documents: Iterable[Any], dry_run: bool = False) -> list[dict[str, Any]]:
        """Create or update resources atomically; returns ``[{"kind","namespace","name","action"}]``."""
        body = {"documents": [_document_json(d) for d in documents], "dryRun": dry_run}
        return list(self._call("POST", "/v1/apply", body)["results"])

    def delete(self, documents: Iterable[Any]) -> list[dict[str, Any]]:
        """Delete the resources the documents name (kind, metadata.name/namespace)."""
        body = {"documents": [_document_json(d) for d in documents]}
        return list(self._call("POST", "/v1/delete", body)["results"])

    def get(self, kind: str, name: str | None = None, namespace: str | None = None) -> list[dict[str, Any]]:
        """Stored resources of ``kind`` (case-insensitive) as applied, with their namespace filled in."""
        query = {k: v for k, v in (("kind", kind), ("name", name), ("namespace", namespace)) if v}
        return list(self._call("GET", "/v1/resources?" + urlencode(query))["items"])

    def status(self) -> dict[str, Any]:
        """``{"version", "proxies": [{"id","workload","namespace","connected","ready","ackedVersion","nack",
        ...}]}``."""
        return dict(self._call("GET", "/v1/status"))

    def traces(self, trace_id: str | None = None, limit: int = 20) -> dict[str, Any]:
        """Recent traces (``{"traces": [...], "received"}``) or one trace's spans (``{"traceId", "spans"}``)."""
        query = {"id": trace_id} if trace_id else {"limit": str(limit)}
        return dict(self._call("GET", "/v1/traces?" + urlencode(query)))

    def rotate_root(self, grace: float | None = None) -> dict[str, Any]:
        """Start a root rotation; ``{"switchAt", "roots"}``."""
        return dict(self._call("POST", "/v1/ca/rotate", {} if grace is None else {"grace": grace}))

    def registry(self) -> dict[str, Any]:
        """``{"services": [...], "instances": [...]}``."""
        return dict(self._call("GET", "/v1/registry"))

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        if payload is not None:
            headers["Content-Type"] = "application/json"
        connection = (http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout, context=self.tls)
                      if self.tls is not None else http.client.HTTPConnection(self.host, self.port,
                                                                              timeout=self.timeout))
        try:
            if self.tls is not None:
                connection.connect()
                sock = connection.sock
                assert isinstance(sock, ssl.SSLSocket)
                problem = check_control_plane(sock.getpeercert(), self.trust_domain)
                if problem:
                    raise ApiError(0, [f"control plane at {self.host}:{self.port}: {problem}"])
            connection.request(method, path, body=payload, headers=headers)
            response = connection.getresponse()
            data = response.read()
        except (ConnectionRefusedError, socket.gaierror) as exc:
            raise NoMeshError(self.state_dir or f"{self.host}:{self.port}", str(exc)) from exc
        except (OSError, http.client.HTTPException) as exc:
            raise ApiError(0, [f"control plane at {self.host}:{self.port} failed: {exc}"]) from exc
        finally:
            connection.close()
        try:
            decoded = json.loads(data) if data else {}
        except ValueError:
            decoded = {}
        if response.status >= 400:
            errors = decoded.get("errors") if isinstance(decoded, dict) else None
            raise ApiError(response.status, [str(e) for e in errors] if isinstance(errors, list)
                           else [f"control plane answered {response.status} {response.reason}"])
        return decoded
