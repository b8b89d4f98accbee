"""A do-nothing ext_proc server in Python (grpc.aio): the floor any Python endpoint picker pays per request.

It answers request headers with a fixed pick (round robin over the addresses given) and every other message
with "continue", holding no state: what `bench.gateway` measures beside `forestall picker` to separate the cost
of gRPC in Python from the cost of picking. Not a picker: no load, no health, no sessions.

    python -m bench._null_extproc PORT ADDRESS [ADDRESS ...]
"""

from __future__ import annotations

import asyncio
import itertools
import sys

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from balancer import extproc


class _Null(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    def __init__(self, addresses: list[str]) -> None:
        self.picks = itertools.cycle([extproc._routed((a,), phase="request_headers") for a in addresses])
        self.other = pb.ProcessingResponse(response_headers=pb.HeadersResponse())
        self.trailers = pb.ProcessingResponse(response_trailers=pb.TrailersResponse())

    async def Process(self, requests: object, context: grpc.aio.ServicerContext) -> None:  # gRPC's name
        while (req := await context.read()) is not grpc.aio.EOF:
            kind = req.WhichOneof("request")
            if kind == "request_headers":
                await context.write(next(self.picks))
            elif kind == "response_trailers":
                await context.write(self.trailers)
            else:
                await context.write(self.other)


async def _serve(port: int, addresses: list[str]) -> None:
    server = grpc.aio.server()
    pb_grpc.add_ExternalProcessorServicer_to_server(_Null(addresses), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"null ext_proc listening on {port}", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(_serve(int(sys.argv[1]), sys.argv[2:]))
