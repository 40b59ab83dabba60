"""The receive-only baseline: what gRPC alone costs per request, before pathwatch does anything.

Run as ``python -m bench.receive`` (pinned to the service's core by the orchestrator). It serves
the OTLP metrics Export method with grpcio's asyncio server and pathwatch's own server options,
and acknowledges every request with an empty response without looking at it: the receive,
HTTP/2 framing and gzip inflation that every Export costs the service. It prints one JSON
line, ``{"event": "ready", "port": N}``, once it listens on a free loopback port, and serves
until it is terminated (SIGTERM) or its stdin closes.

The load generator then drives it exactly as it drives the service (bench.loadgen, job
``fleet``), so the CPU it uses per acknowledged resource is the floor of the service's own:
the report sets ingest against it as well as against the parse-only baseline.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys

import grpc

from pathwatch.config.model import GrpcReceiverConfig
from pathwatch.receiver.grpc_server import _server_options

SERVICE = "opentelemetry.proto.collector.metrics.v1.MetricsService"


async def serve() -> None:
    server = grpc.aio.server(options=_server_options(GrpcReceiverConfig()))

    async def export(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return b""  # an empty ExportMetricsServiceResponse: full success

    handler = grpc.method_handlers_generic_handler(
        SERVICE, {"Export": grpc.unary_unary_rpc_method_handler(export)}
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(json.dumps({"event": "ready", "port": port}), flush=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_reader(sys.stdin.fileno(), stop.set)  # the orchestrator is gone: stop too
    await stop.wait()
    await server.stop(1.0)


def main(argv: list[str]) -> int:
    if argv:
        print("usage: python -m bench.receive", file=sys.stderr)
        return 2
    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
