"""Open Inference Protocol (KServe v2) REST: request tensors -> feature matrix, predictions -> response.

Two input layouts are accepted:
- one tensor of shape ``[N, n_features]`` (any name), columns in the model's feature order;
- one tensor of shape ``[N]`` (or ``[N, 1]``) per feature, named by feature (``BYTES`` allowed for
  categorical features, mapped through the model's categories).
JSON ``data`` may be flat (row-major) or nested. The binary tensor extension is supported both ways:
``Inference-Header-Content-Length`` gives the JSON header's length, tensors with
``parameters.binary_data_size`` follow it in order; outputs requested with ``binary_data`` (or the
request parameter ``binary_data_output``) are returned the same way.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from workers.model import Model

DTYPES = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
}


class BadRequest(ValueError):
    """The request is malformed: a 400 with this message."""


@dataclass
class InferRequest:
    id: str | None
    matrix: np.ndarray
    binary_outputs: set[str]
    requested: list[str] | None


def _bytes_tensor(raw: bytes) -> list[str]:
    out, i = [], 0
    while i < len(raw):
        if i + 4 > len(raw):
            raise BadRequest("BYTES tensor is truncated")
        (n,) = struct.unpack_from("<I", raw, i)
        i += 4
        out.append(raw[i:i + n].decode("utf-8", errors="replace"))
        i += n
    return out


def _tensor(spec: dict, binary: memoryview | None, offset: int) -> tuple[np.ndarray | list, int]:
    name = spec.get("name")
    dtype = spec.get("datatype")
    shape = spec.get("shape")
    if not isinstance(name, str) or not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0
                                                                          for d in shape):
        raise BadRequest(f"input {name!r}: needs a name and a shape of non-negative integers")
    if dtype not in DTYPES and dtype != "BYTES":
        raise BadRequest(f"input {name!r}: datatype {dtype!r} is not supported (use FP32, FP64, INT*, BOOL or BYTES)")
    size = int(np.prod(shape)) if shape else 1
    params = spec.get("parameters") or {}
    if "binary_data_size" in params:
        n = params["binary_data_size"]
        if binary is None or not isinstance(n, int) or n < 0 or offset + n > len(binary):
            raise BadRequest(f"input {name!r}: binary_data_size {n!r} does not fit the binary body")
        raw = bytes(binary[offset:offset + n])
        offset += n
        if dtype == "BYTES":
            values: np.ndarray | list = _bytes_tensor(raw)
        else:
            itemsize = np.dtype(DTYPES[dtype]).itemsize
            if len(raw) != size * itemsize:
                raise BadRequest(f"input {name!r}: {len(raw)} bytes do not hold shape {shape} of {dtype}")
            values = np.frombuffer(raw, dtype=np.dtype(DTYPES[dtype]).newbyteorder("<"))
    else:
        if "data" not in spec:
            raise BadRequest(f"input {name!r}: no data")
        data = spec["data"]
        if dtype == "BYTES":
            flat = np.asarray(data, dtype=object).ravel().tolist()
            values = [v if isinstance(v, str) else str(v) for v in flat]
        else:
            try:
                values = np.asarray(data, dtype=np.float64).ravel()
            except (TypeError, ValueError):
                raise BadRequest(f"input {name!r}: data must be numbers for {dtype}") from None
    if len(values) != size:
        raise BadRequest(f"input {name!r}: {len(values)} values do not match shape {shape}")
    if isinstance(values, np.ndarray):
        values = values.astype(np.float64).reshape(shape) if shape else values.astype(np.float64)
    return values, offset


def parse(body: bytes, header_length: int | None, model: Model) -> InferRequest:
    """Decode an infer request (JSON, or JSON header + binary tensors) into the model's feature matrix."""
    if header_length is not None:
        if header_length < 0 or header_length > len(body):
            raise BadRequest("Inference-Header-Content-Length is larger than the body")
        head, binary = body[:header_length], memoryview(body)[header_length:]
    else:
        head, binary = body, None
    try:
        req = orjson.loads(head)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"body is not valid JSON: {exc}") from None
    if not isinstance(req, dict) or not isinstance(req.get("inputs"), list) or not req["inputs"]:
        raise BadRequest("body must be an object with a non-empty 'inputs' list")
    offset = 0
    tensors: dict[str, Any] = {}
    for spec in req["inputs"]:
        if not isinstance(spec, dict):
            raise BadRequest("each input must be an object")
        values, offset = _tensor(spec, binary, offset)
        tensors[spec["name"]] = values
    matrix = _to_matrix(tensors, model)
    outputs = req.get("outputs")
    requested, binary_out = None, set()
    params = req.get("parameters") or {}
    if isinstance(outputs, list):
        requested = []
        for o in outputs:
            if not isinstance(o, dict) or not isinstance(o.get("name"), str):
                raise BadRequest("each requested output needs a name")
            requested.append(o["name"])
            if (o.get("parameters") or {}).get("binary_data"):
                binary_out.add(o["name"])
    if params.get("binary_data_output"):
        binary_out.add("*")
    rid = req.get("id")
    return InferRequest(rid if isinstance(rid, str) else None, matrix, binary_out, requested)


def _to_matrix(tensors: dict[str, Any], model: Model) -> np.ndarray:
    names = model.feature_names
    if len(tensors) == 1:
        (name, values), = tensors.items()
        if isinstance(values, np.ndarray) and values.ndim == 2 and name not in names:
            if values.shape[1] != len(names):
                raise BadRequest(f"input {name!r} has {values.shape[1]} columns; the model takes {len(names)}")
            return np.ascontiguousarray(values, dtype=np.float64)
    missing = [n for n in names if n not in tensors]
    if missing:
        raise BadRequest(f"send one [N, {len(names)}] tensor, or one [N] tensor per feature; missing {missing[:10]}")
    rows = {len(v) if isinstance(v, list) else v.shape[0] for v in (tensors[n] for n in names)}
    if len(rows) != 1:
        raise BadRequest(f"per-feature tensors have different lengths {sorted(rows)}")
    n = rows.pop()
    matrix = np.empty((n, len(names)), dtype=np.float64)
    for j, name in enumerate(names):
        values = tensors[name]
        cats = model.categorical.get(j)
        if isinstance(values, list):  # BYTES
            if cats is None:
                raise BadRequest(f"input {name!r}: BYTES only for categorical features")
            index = {str(c): float(i) for i, c in enumerate(cats)}
            matrix[:, j] = [index.get(v, np.nan) for v in values]
        else:
            if values.ndim == 2 and values.shape[1] == 1:
                values = values[:, 0]
            if values.ndim != 1:
                raise BadRequest(f"input {name!r}: shape must be [N] or [N, 1]")
            matrix[:, j] = values
    return matrix


def outputs(pred: np.ndarray, model: Model) -> dict[str, tuple[str, list[int], np.ndarray]]:
    """name -> (datatype, shape, values) for every output the model gives."""
    n = pred.shape[0]
    if model.multiclass:
        return {
            "score": ("FP64", [n], pred.max(axis=1)),
            "label": ("INT64", [n], pred.argmax(axis=1).astype(np.int64)),
            "scores": ("FP64", [n, model.num_class], pred),
        }
    return {"score": ("FP64", [n], pred.astype(np.float64))}


def response(pred: np.ndarray, model: Model, name: str, req: InferRequest) -> tuple[bytes, int | None]:
    """(body, header length or None): JSON, or JSON header + binary tensors when any were asked binary."""
    outs = outputs(pred, model)
    wanted = req.requested or list(outs)
    unknown = [w for w in wanted if w not in outs]
    if unknown:
        raise BadRequest(f"unknown output(s) {unknown}; this model gives {list(outs)}")
    items, blobs = [], []
    for w in wanted:
        dtype, shape, values = outs[w]
        if w in req.binary_outputs or "*" in req.binary_outputs:
            blob = np.ascontiguousarray(values, dtype=np.float64 if dtype == "FP64" else np.int64).astype(
                "<f8" if dtype == "FP64" else "<i8").tobytes()
            blobs.append(blob)
            items.append({"name": w, "datatype": dtype, "shape": shape, "parameters": {"binary_data_size": len(blob)}})
        else:
            items.append({"name": w, "datatype": dtype, "shape": shape, "data": values.ravel().tolist()})
    head = {"model_name": name, "model_version": model.version, "outputs": items}
    if req.id is not None:
        head["id"] = req.id
    header = orjson.dumps(head)
    if blobs:
        return header + b"".join(blobs), len(header)
    return header, None


def metadata(model: Model, name: str) -> dict:
    inputs = []
    for j, feature in enumerate(model.feature_names):
        cats = model.categorical.get(j)
        inputs.append({"name": feature, "datatype": "BYTES" if cats else "FP64", "shape": [-1]})
    outs = [{"name": k, "datatype": d, "shape": [-1] + s[1:]} for k, (d, s, _) in
            outputs(np.zeros((0, model.num_class) if model.multiclass else 0), model).items()]
    return {"name": name, "versions": [model.version], "platform": "lightgbm", "inputs": inputs, "outputs": outs,
            "parameters": {"matrix_input": f"or one FP32/FP64 tensor of shape [-1, {len(model.feature_names)}] "
                                           "with the features in this order"}}
