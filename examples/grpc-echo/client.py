"""A gRPC client for the echo example: makes calls through its sidecar and prints what it saw, as JSON.

Usage: python client.py TARGET METHOD [REQUEST] [--count N] [--timeout S] [--metadata KEY=VALUE ...]
       python client.py TARGET health [SERVICE]

``TARGET`` is the service, ``echo:50051``. The client is a plain grpcio one: in proxy mode the runtime names the
sidecar in ``grpc_proxy``, grpcio opens a ``CONNECT`` tunnel through it, and the sidecar routes each call inside
the tunnel on its own; in transparent mode the connection to ``echo:50051`` is captured.

Output: ``{"replies": [...], "errors": [{"code": ..., "details": ..., "flags": ...}], "seconds": ...}``: one
entry per call and the seconds all calls took (``flags`` is the mesh's ``x-kizuna-flags`` trailer when the
mesh made the error); for ``health``, ``{"status": "SERVING"}`` or the error.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def channel(target: str) -> grpc.Channel:
    """A channel to ``target``, as any grpcio app makes one (``grpc_proxy`` honoured)."""
    return grpc.insecure_channel(target)


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
