"""A small gRPC echo service for the mesh examples, with the standard gRPC health service beside it.

Usage: python echo.py ADDRESS PORT VERSION

Methods of ``echo.Echo`` (raw bytes in and out, so no generated code is needed):

- ``Say``: answers ``VERSION:<request>``, so a reply names the version that served it.
- ``Sleep``: waits ``<request>`` seconds (a decimal number), then answers like ``Say``.
- ``Deadline``: answers the seconds left before the caller's deadline, as this server sees it (``none``
  when the call carries no deadline): what shows a deadline travelled through the sidecars.
- ``FailNext``: the next ``<request>`` calls of ``Say`` fail with UNAVAILABLE (a flaky server, on demand).

``grpc.health.v1.Health`` answers SERVING for ``""`` and ``echo.Echo``.
"""

from __future__ import annotations

import sys
import threading
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc


class Echo:
    """The ``echo.Echo`` methods; ``failing`` counts the ``Say`` calls still to fail."""

    def __init__(self, version: str) -> None:
        self.version = version.encode()
        self.failing = 0
        self.lock = threading.Lock()

    def say(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        with self.lock:
            fail, self.failing = self.failing > 0, max(self.failing - 1, 0)
        if fail:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.version.decode()} is flaky")
        return self.version + b":" + request

    def sleep(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        time.sleep(float(request))
        return self.version + b":" + request

    def deadline(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        left = context.time_remaining()  # grpcio: about 2**63 (seconds) when the call has no deadline
        return b"none" if left is None or left > 1e9 else b"%.3f" % left

    def fail_next(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        with self.lock:
            self.failing = int(request)
        return self.version + b":failing " + request


def serve(address: str, port: int, version: str) -> grpc.Server:
    """Start the echo and health services on ``address:port``."""
    echo = Echo(version)
    methods = {"Say": echo.say, "Sleep": echo.sleep, "Deadline": echo.deadline, "FailNext": echo.fail_next}
    handler = grpc.method_handlers_generic_handler(
        "echo.Echo", {name: grpc.unary_unary_rpc_method_handler(method) for name, method in methods.items()})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    server.add_generic_rpc_handlers((handler,))
    checker = health.HealthServicer()
    for service in ("", "echo.Echo"):
        checker.set(service, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    server.add_insecure_port(f"{address}:{port}")
    server.start()
    return server


if __name__ == "__main__":
    serve(sys.argv[1], int(sys.argv[2]), sys.argv[3]).wait_for_termination()
