"""The discovery stream between control plane and sidecar, sans-I/O: messages and their framing.

Transport: the sidecar opens ``GET /v1/discovery`` with ``Upgrade: kizuna-xds`` and a bearer token; after
``101 Switching Protocols`` both sides exchange newline-delimited JSON messages on the same connection.
Semantics follow xDS (state of the world):

- sidecar → control plane: ``Hello`` (node, the version it runs), ``Ack``/``Nack`` per pushed nonce,
  ``Health`` when its app's readiness changes;
- control plane → sidecar: ``Push`` (version, nonce, whole snapshot). A NACKed snapshot is not applied; the
  sidecar keeps its last good one and the control plane records the reason (``kizuna status``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from kizuna.proxyconfig.bootstrap import Node

UPGRADE_TOKEN = "kizuna-xds"
DISCOVERY_PATH = "/v1/discovery"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Hello:
    """First message of a stream: who the sidecar is and which config version it already runs."""

    node: Node
    version: str = ""
    ready: bool = False


@dataclass(frozen=True, slots=True)
class Push:
    """A new snapshot for the sidecar (raw JSON, decoded by the receiver so a bad one can be NACKed)."""

    version: str
    nonce: str
    snapshot: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Ack:
    """The sidecar applied the push with this nonce."""

    nonce: str
    version: str


@dataclass(frozen=True, slots=True)
class Nack:
    """The sidecar rejected the push with this nonce and keeps ``version`` (its last good one)."""

    nonce: str
    version: str
    error: str


@dataclass(frozen=True, slots=True)
class Health:
    """The sidecar's view of its app's readiness changed."""

    ready: bool


Message = Hello | Push | Ack | Nack | Health


def encode(message: Message) -> bytes:
    """One message as one JSON line."""
    body: dict[str, Any]
    if isinstance(message, Hello):
        body = {"type": "hello", "node": message.node.to_json(), "version": message.version,
                "ready": message.ready}
    elif isinstance(message, Push):
        body = {"type": "push", "version": message.version, "nonce": message.nonce,
                "snapshot": message.snapshot}
    elif isinstance(message, Ack):
        body = {"type": "ack", "nonce": message.nonce, "version": message.version}
    elif isinstance(message, Nack):
        body = {"type": "nack", "nonce": message.nonce, "version": message.version, "error": message.error}
    else:
        body = {"type": "health", "ready": message.ready}
    return json.dumps(body, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> Message:
    """Parse one JSON line; raises ValueError on anything malformed."""
    try:
        data = json.loads(line)
        kind = data["type"]
        if kind == "hello":
            return Hello(Node.from_json(data["node"]), str(data.get("version", "")), bool(data.get("ready")))
        if kind == "push":
            return Push(str(data["version"]), str(data["nonce"]), dict(data["snapshot"]))
        if kind == "ack":
            return Ack(str(data["nonce"]), str(data["version"]))
        if kind == "nack":
            return Nack(str(data["nonce"]), str(data["version"]), str(data["error"]))
        if kind == "health":
            return Health(bool(data["ready"]))
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"malformed discovery message: {exc}") from exc
    raise ValueError(f"unknown discovery message type {kind!r}")


class Framer:
    """Splits a byte stream into messages. Feed bytes, get messages; keeps the partial tail."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Message]:
        self._buffer += data
        if len(self._buffer) > MAX_MESSAGE_BYTES:
            raise ValueError("discovery message too large")
        messages: list[Message] = []
        while (end := self._buffer.find(b"\n")) >= 0:
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            if line.strip():
                messages.append(decode(line))
        return messages
