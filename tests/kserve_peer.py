"""Run by tests/test_kserve_client.py in its own venv (kserve 0.21 pins old cloudevents/pandas, so it cannot
share ours): KServe's ``InferenceGRPCClient`` against our gRPC server. Prints one JSON object.

Usage: python kserve_peer.py HOST:PORT MODEL_NAME INPUTS.npy
"""

from __future__ import annotations

import asyncio
import json
import sys

import grpc
import numpy as np
from kserve import InferenceGRPCClient, InferInput, InferRequest
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb


async def main(addr: str, name: str, inputs: str) -> dict:
    x = np.load(inputs)
    out: dict = {}
    async with InferenceGRPCClient(addr, retries=0) as client:
        out["live"] = await client.is_server_live()
        out["ready"] = await client.is_server_ready()
        out["model_ready"] = await client.is_model_ready(name)
        # The client has no metadata call; its own generated stub does (the messages are kserve's, not ours).
        meta = await client._client_stub.ModelMetadata(pb.ModelMetadataRequest(name=name))
        out["metadata"] = {"name": meta.name, "platform": meta.platform, "versions": list(meta.versions),
                           "inputs": [(t.name, t.datatype, list(t.shape)) for t in meta.inputs],
                           "outputs": [(t.name, t.datatype, list(t.shape)) for t in meta.outputs]}
        # FP32 [N, F] as a numpy array: the client sends raw_input_contents.
        x32 = x.astype(np.float32)
        tensor = InferInput("input", list(x32.shape), "FP32", data=x32)
        reply = await client.infer(InferRequest(name, [tensor], request_id="fp32-raw"))
        out["fp32_raw"] = {"id": reply.id, "model": reply.model_name, "version": reply.model_version,
                           "outputs": {o.name: o.as_numpy().tolist() for o in reply.outputs}}
        # FP64 [N, F] as a flat list: the client sends typed fp64_contents.
        tensor = InferInput("input", list(x.shape), "FP64", data=x.ravel().tolist())
        reply = await client.infer(InferRequest(name, [tensor], request_id="fp64-contents"))
        out["fp64_contents"] = {"id": reply.id, "outputs": {o.name: o.as_numpy().tolist() for o in reply.outputs}}
        # One FP64 [N] tensor per feature, raw.
        names = [t[0] for t in out["metadata"]["inputs"]]
        columns = [InferInput(n, [x.shape[0]], "FP64", data=np.ascontiguousarray(x[:, j])) for j, n in enumerate(names)]
        reply = await client.infer(InferRequest(name, columns))
        out["fp64_columns"] = {o.name: o.as_numpy().tolist() for o in reply.outputs}
        try:
            await client.infer(InferRequest("no-such-model", [InferInput("input", list(x.shape), "FP64", data=x)]))
            out["unknown_model"] = "answered"
        except grpc.RpcError as exc:
            out["unknown_model"] = [exc.code().name, exc.details()]
    return out


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(*sys.argv[1:4]))))
