"""gRPC load generator for the serve benchmark: one process (pinned to its own core by the caller, taskset), one
HTTP/2 connection per concurrent caller, each sending the same pre-serialized ``ModelInfer`` request back to back.

The request is sent as bytes (no serializer), so the client spends its core on the calls, not on protobuf; the
caller checks every server's answer before timing (``serve_peers.check_grpc``). Usage:
    python grpc_load.py HOST:PORT CONNECTIONS SECONDS WARMUP_SECONDS REQUEST_FILE
Prints one JSON line: requests, seconds, errors, p50_ms, p99_ms.
"""

from __future__ import annotations

import asyncio
import json
import sys

import grpc

METHOD = "/inference.GRPCInferenceService/ModelInfer"


async def main() -> None:
    target, conns, seconds, warmup, path = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), \
        sys.argv[5]
    body = open(path, "rb").read()
    options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20),
               # one connection per caller: without this, channels to one target may share a subchannel
               ("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.insecure_channel(target, options=options) for _ in range(conns)]
    calls = [ch.unary_unary(METHOD) for ch in channels]
    latencies: list[float] = []
    errors = 0
    loop = asyncio.get_running_loop()
    measure_from = loop.time() + warmup
    stop = measure_from + seconds

    async def caller(call) -> None:
        nonlocal errors
        while True:
            t = loop.time()
            if t >= stop:
                return
            try:
                await call(body, timeout=30)
            except grpc.aio.AioRpcError:
                errors += 1
                continue
            if t >= measure_from:
                latencies.append(loop.time() - t)

    await asyncio.gather(*(caller(c) for c in calls))
    for ch in channels:
        await ch.close()
    latencies.sort()
    n = len(latencies)
    print(json.dumps({"requests": n, "seconds": seconds, "errors": errors,
                      "p50_ms": latencies[n // 2] * 1000 if n else 0.0,
                      "p99_ms": latencies[min(n - 1, int(n * 0.99))] * 1000 if n else 0.0}))


if __name__ == "__main__":
    asyncio.run(main())
