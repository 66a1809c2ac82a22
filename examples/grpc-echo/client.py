"""A gRPC client for the echo example: makes calls through its sidecar and prints what it saw, as JSON.

Usage: python client.py TARGET METHOD [REQUEST] [--count N] [--timeout S] [--metadata KEY=VALUE ...]
       python client.py TARGET health [SERVICE]

``TARGET`` is the service, ``echo:50051``. In proxy mode the runtime names the sidecar in ``grpc_proxy``; grpcio
would tunnel through it with ``CONNECT`` (one opaque TCP connection, so no per-call routing or retries), so
the client dials the sidecar itself with HTTP/2 (prior knowledge) and names the service as the ``:authority``,
as an HTTP/2 client of an HTTP proxy does. Without ``grpc_proxy`` (transparent mode) it dials the target.

Output: ``{"replies": [...], "errors": [{"code": ..., "details": ..., "flags": ...}], "seconds": ...}``: one
entry per call and the seconds all calls took (``flags`` is the mesh's ``x-kizuna-flags`` trailer when the
mesh made the error); for ``health``, ``{"status": "SERVING"}`` or the error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any
from urllib.parse import urlsplit

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def channel(target: str) -> grpc.Channel:
    """A channel to ``target``: through the sidecar named by ``grpc_proxy`` when there is one."""
    proxy = os.environ.get("grpc_proxy")
    if not proxy:
        return grpc.insecure_channel(target, options=[("grpc.enable_http_proxy", 0)])
    sidecar = urlsplit(proxy).netloc
    return grpc.insecure_channel(sidecar, options=[("grpc.default_authority", target),
                                                   ("grpc.enable_http_proxy", 0)])


def error(exc: grpc.RpcError) -> dict[str, Any]:
    trailers = dict(exc.trailing_metadata() or ())
    return {"code": exc.code().name, "details": exc.details(),
            "flags": trailers.get("x-kizuna-flags")}


def main(argv: list[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("target")
    parser.add_argument("method", help="Say, Sleep, Deadline, FailNext or health")
    parser.add_argument("request", nargs="?", help="the request (default hello; health: the service, default \"\")")
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    metadata = tuple(tuple(item.split("=", 1)) for item in args.metadata)
    with channel(args.target) as chan:
        if args.method == "health":
            service = args.request or ""
            try:
                reply = health_pb2_grpc.HealthStub(chan).Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=args.timeout, metadata=metadata)
            except grpc.RpcError as exc:
                return error(exc)
            return {"status": health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}
        call = chan.unary_unary(f"/echo.Echo/{args.method}")
        replies: list[str] = []
        errors: list[dict[str, Any]] = []
        request = (args.request or "hello").encode()
        began = time.monotonic()
        for _ in range(args.count):
            try:
                replies.append(call(request, timeout=args.timeout, metadata=metadata).decode())
            except grpc.RpcError as exc:
                errors.append(error(exc))
        return {"replies": replies, "errors": errors, "seconds": round(time.monotonic() - began, 3)}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
