"""Open Inference Protocol (KServe v2) REST: request tensors -> feature matrix, predictions -> response.

Two input layouts are accepted:
- one tensor of shape ``[N, n_features]`` (any name), columns in the model's feature order;
- one tensor of shape ``[N]`` (or ``[N, 1]``) per feature, named by feature.
A feature with a pandas category list takes its category *values*, mapped through the list to codes as batch and
stream modes do (unknown values are missing): numbers for numeric categories (in either layout), BYTES strings
for any. A categorical feature without a list (``categorical_feature`` integer codes) takes the codes as numbers.
JSON ``data`` may be flat (row-major) or nested exactly like ``shape``; each value must fit its datatype (BOOL
true/false, integers (5.0 too) within the INT/UINT range, FP numbers within range, null or NaN for missing: tritonclient
writes NaN literally with binary_data=False, so ``NaN``/``Infinity`` are read although they are not JSON). An
input that is no feature, an input with both ``data`` and ``binary_data_size``, or bytes left after the last
binary tensor are refused. The binary tensor extension is supported
both ways: ``Inference-Header-Content-Length`` gives the JSON header's length, tensors with
``parameters.binary_data_size`` follow it in order; outputs requested with ``binary_data`` (or the
request parameter ``binary_data_output``) are returned the same way.

The numbers of the usual request (FP tensors of JSON numbers and null) are read by the native reader
(``_jsonrows.oip_data``: no Python float per value; orjson reads the rest of the request); anything it does not
take, or any request that turns out to be malformed, is read again by the Python path, which gives the answer or
the error, so both paths answer alike by construction (tests/test_oip_native.py checks it differentially).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from itertools import chain
from typing import Any

import numpy as np
import orjson

from workers.errors import BadRequest, InputError
from workers.scoring.features import model_values
from workers.scoring.model import Model

try:  # the native reader (workers/decode/_jsonrows.cpp), built by the install
    from workers.decode import _jsonrows
except ImportError:  # pragma: no cover - a source tree without the built module: the Python path alone
    _jsonrows = None  # type: ignore[assignment]

# (float64 values, rows (-1: flat), cols) of one input's data read by the native reader
Native = tuple[bytearray, int, int]


class _Slow(Exception):
    """The native reader's values do not fit this input: the request goes to the Python path."""

DTYPES = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
}


@dataclass
class InferRequest:
    id: str | None
    matrix: np.ndarray
    binary_outputs: set[str]
    requested: list[str] | None


# A shape dimension beyond this cannot be real (the body limit is far smaller); refusing it early keeps numpy from
# ever seeing a shape whose product overflows.
MAX_DIM = 2**31 - 1


def _parameters(obj: dict, where: str) -> dict:
    """An object's ``parameters`` (absent or null: none); anything but a JSON object is a 400."""
    params = obj.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise BadRequest(f"{where}: 'parameters' must be an object, got {_kind(params)}")
    return params


def _flag(params: dict, key: str, where: str) -> bool:
    value = params.get(key, False)
    if not isinstance(value, bool):
        raise BadRequest(f"{where}: parameters.{key} must be true or false, got {_kind(value)}")
    return value


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


def _bytes_tensor(name: str, raw: bytes) -> list[str]:
    out, i = [], 0
    while i < len(raw):
        if i + 4 > len(raw):
            raise BadRequest(f"input {name!r}: BYTES tensor is truncated")
        (n,) = struct.unpack_from("<I", raw, i)
        i += 4
        if i + n > len(raw):
            raise BadRequest(f"input {name!r}: BYTES tensor is truncated (element of {n} bytes past the end)")
        try:
            out.append(raw[i:i + n].decode("utf-8"))
        except UnicodeDecodeError:
            raise BadRequest(f"input {name!r}: BYTES element {len(out)} is not UTF-8 text") from None
        i += n
    return out


def _nesting(data: Any, depth: int = 0) -> tuple[int, ...] | None:
    """The shape of nested JSON lists (a flat list: its length); None when ragged or deeper than a tensor here
    can be (two dimensions)."""
    if not isinstance(data, list):
        return ()
    if depth >= 2:
        return None
    if not data:
        return (0,)
    inner = [_nesting(d, depth + 1) for d in data]
    first = inner[0]
    if first is None or any(i != first for i in inner):
        return None
    return (len(data), *first)


_NUMBERS = frozenset({int, float, type(None)})


def _numbers(data: list, shape: list[int], size: int) -> np.ndarray | None:
    """The common case at C speed: ``size`` JSON numbers or nulls, flat or in rows nested exactly like a 2-D
    ``shape``, as float64 (null: NaN). None when anything else is there: the checked path below then decides
    and names the problem. The same conversion as that path, without a Python call per value (walking every
    value through ``_nesting`` and the type checks cost about 7 us a row of 30 at 100 rows per request)."""
    if type(data[0]) is list:
        if len(shape) != 2 or len(data) != shape[0] or not all(type(r) is list and len(r) == shape[1]
                                                                for r in data):
            return None
        kinds = set(map(type, chain.from_iterable(data)))
    elif len(data) == size:
        kinds = set(map(type, data))
    else:
        return None
    if not kinds <= _NUMBERS:
        return None
    return np.array(data, dtype=np.float64).reshape(-1)


def _json_values(name: str, dtype: str, data: Any, shape: list[int], size: int) -> np.ndarray:
    """JSON ``data`` -> a flat array of ``size`` values: row-major flat, or nested exactly like ``shape``."""
    if not isinstance(data, list):
        raise BadRequest(f"input {name!r}: data must be a list, got {_kind(data)}")
    if dtype.startswith("FP") and data:
        values = _numbers(data, shape, size)
        if values is not None:
            return _in_range(name, dtype, values)
    nest = _nesting(data)
    if nest is None or (len(nest) > 1 and list(nest) != shape):
        what = "BYTES data" if dtype == "BYTES" else "data"
        raise BadRequest(f"input {name!r}: {what} is nested as {list(nest) if nest else 'ragged lists'}; "
                         f"send it flat (row-major) or nested like shape {shape}")
    flat = data if len(nest) <= 1 else np.asarray(data, dtype=object).ravel().tolist()
    if len(flat) != size:
        raise BadRequest(f"input {name!r}: {len(flat)} values do not match shape {shape}")
    if dtype == "BYTES":
        if not all(isinstance(v, str) for v in flat):
            bad = next(v for v in flat if not isinstance(v, str))
            raise BadRequest(f"input {name!r}: BYTES data must be strings, got {_kind(bad)}")
        return np.array(flat, dtype=object)
    # Each value must be what its datatype holds (numpy would also parse "1.5" or "nan" strings, cast 300 into an
    # INT8 or 11.5 into an INT64 without a word): BOOL true/false; integers within the type's range; FP numbers,
    # null or NaN (missing, what tritonclient sends for NaN with binary_data=False), within the type's range.
    if dtype == "BOOL":
        bad = next((v for v in flat if type(v) is not bool), _NONE)
        if bad is not _NONE:
            raise BadRequest(f"input {name!r}: BOOL data must be true or false, got {_shown(bad)}")
        return np.array(flat, dtype=np.float64) if flat else np.empty(0)
    if dtype.startswith(("INT", "UINT")):
        # An integral float (5.0) is the integer it spells; 11.5, true, null or NaN are not integers.
        bad = next((v for v in flat if not (type(v) is int or type(v) is float and v.is_integer())), _NONE)
        if bad is not _NONE:
            raise BadRequest(f"input {name!r}: {dtype} data must be integers, got {_shown(bad)}")
        info = np.iinfo(DTYPES[dtype])
        bad = next((v for v in flat if not info.min <= v <= info.max), _NONE)
        if bad is not _NONE:
            raise BadRequest(f"input {name!r}: {bad} is out of the {dtype} range [{info.min}, {info.max}]")
        return np.array(flat, dtype=np.float64) if flat else np.empty(0)
    bad = next((v for v in flat if type(v) not in (int, float, type(None))), _NONE)
    if bad is not _NONE:
        raise BadRequest(f"input {name!r}: {dtype} data must be numbers (or null: missing), got {_shown(bad)}")
    values = np.array([math.nan if v is None else v for v in flat], dtype=np.float64) if flat else np.empty(0)
    return _in_range(name, dtype, values)


def _in_range(name: str, dtype: str, values: np.ndarray) -> np.ndarray:
    top = float(np.finfo(DTYPES[dtype]).max)
    big = np.isfinite(values) & (np.abs(values) > top)
    if big.any():
        raise BadRequest(f"input {name!r}: {float(values[big][0])!r} is out of the {dtype} range")
    return values


_NONE = object()  # no offending value


def _shown(value: Any) -> str:
    text = value if isinstance(value, bool | int | float | type(None)) else _kind(value)
    return orjson.dumps(text).decode() if not isinstance(text, str) else text


def raw_values(name: str, dtype: str, shape: list[int], raw: bytes) -> np.ndarray:
    """A tensor's raw bytes (REST's binary extension, gRPC's ``raw_input_contents``) -> a flat array: float64,
    or object (str) for BYTES (each element a 4-byte little-endian length, then its UTF-8 bytes)."""
    size = math.prod(shape)
    if dtype == "BYTES":
        values = np.array(_bytes_tensor(name, raw), dtype=object)
        if len(values) != size:
            raise BadRequest(f"input {name!r}: {len(values)} values do not match shape {shape}")
        return values
    itemsize = np.dtype(DTYPES[dtype]).itemsize
    if len(raw) != size * itemsize:
        raise BadRequest(f"input {name!r}: {len(raw)} bytes do not hold shape {shape} of {dtype}")
    return np.frombuffer(raw, dtype=np.dtype(DTYPES[dtype]).newbyteorder("<")).astype(np.float64)


def check_head(name: object, dtype: object, shape: object) -> tuple[str, str, list[int]]:
    """An input's name, datatype and shape, checked as every front end needs them."""
    if not isinstance(name, str) or not name:
        got = "an empty string" if name == "" else _kind(name)
        raise BadRequest(f"each input needs a name (a non-empty string), got {got}")
    if not isinstance(dtype, str) or (dtype not in DTYPES and dtype != "BYTES"):
        raise BadRequest(f"input {name!r}: datatype {dtype!r} is not supported (use FP32, FP64, INT*, BOOL or BYTES)")
    if (not isinstance(shape, list) or not all(type(d) is int and 0 <= d <= MAX_DIM for d in shape)
            or len(shape) not in (1, 2)):
        raise BadRequest(f"input {name!r}: shape must be [N] or [N, k] of non-negative integers, got {shape!r}")
    return name, dtype, shape


def _native_values(name: str, dtype: str, shape: list[int], size: int, native: Native) -> np.ndarray:
    """An input's values from the native reader, laid out as ``_numbers`` takes them; else ``_Slow``."""
    values, rows, cols = native
    if not dtype.startswith("FP"):
        raise _Slow
    if rows < 0 and cols != size or rows >= 0 and (len(shape) != 2 or rows != shape[0] or cols != shape[1]):
        raise _Slow
    return _in_range(name, dtype, np.frombuffer(values, dtype=np.float64))


def _tensor(spec: dict, binary: memoryview | None, offset: int,
            native: Native | None = None) -> tuple[np.ndarray, int]:
    """One input tensor -> (values shaped [N] or [N, k]: float64, or object (str) for BYTES; next offset)."""
    name, dtype, shape = check_head(spec.get("name"), spec.get("datatype"), spec.get("shape"))
    size = math.prod(shape)
    params = _parameters(spec, f"input {name!r}")
    if "binary_data_size" in params and "data" in spec:
        raise BadRequest(f"input {name!r}: both data and parameters.binary_data_size; send one of them")
    if "binary_data_size" in params:
        n = params["binary_data_size"]
        if type(n) is not int or n < 0:
            raise BadRequest(f"input {name!r}: parameters.binary_data_size must be a non-negative integer, got {n!r}")
        if binary is None or offset + n > len(binary):
            raise BadRequest(f"input {name!r}: binary_data_size {n} does not fit the binary body")
        values = raw_values(name, dtype, shape, bytes(binary[offset:offset + n]))
        offset += n
    else:
        if "data" not in spec:
            raise BadRequest(f"input {name!r}: no data (and no parameters.binary_data_size)")
        if native is not None:
            values = _native_values(name, dtype, shape, size, native)
        else:
            values = _json_values(name, dtype, spec["data"], shape, size)
    return values.reshape(shape), offset


def parse(body: bytes, header_length: int | None, model: Model) -> InferRequest:
    """Decode an infer request (JSON, or JSON header + binary tensors) into the model's feature matrix.

    Every way a request can be malformed raises ``BadRequest`` (a 400 naming the field), never another error."""
    if header_length is not None:
        if header_length < 0 or header_length > len(body):
            raise BadRequest("Inference-Header-Content-Length is larger than the body")
        head, binary = body[:header_length], memoryview(body)[header_length:]
    else:
        head, binary = body, None
    native = _jsonrows.oip_data(head) if _jsonrows is not None else None
    if native is not None:
        remainder, tensors = native
        try:
            return _parse(_loads(remainder), binary, model, {i: (v, r, c) for i, v, r, c in tensors})
        except (_Slow, BadRequest):  # read again whole, so the answer or the error is the Python path's
            pass
    return _parse(_loads(head), binary, model, None)


def _parse(req: Any, binary: memoryview | None, model: Model, native: dict[int, Native] | None) -> InferRequest:
    """``parse`` of the loaded JSON ``req``; ``native``: input index -> its values read natively (the request's
    data arrays there are empty)."""
    if not isinstance(req, dict) or not isinstance(req.get("inputs"), list) or not req["inputs"]:
        raise BadRequest("body must be an object with a non-empty 'inputs' list")
    rid = req.get("id")
    if rid is not None and not isinstance(rid, str):
        raise BadRequest(f"'id' must be a string, got {_kind(rid)}")
    params = _parameters(req, "request")
    offset = 0
    tensors: dict[str, np.ndarray] = {}
    for i, spec in enumerate(req["inputs"]):
        if not isinstance(spec, dict):
            raise BadRequest("each input must be an object")
        values, offset = _tensor(spec, binary, offset, native.get(i) if native else None)
        if spec["name"] in tensors:
            raise BadRequest(f"input {spec['name']!r} is given twice")
        tensors[spec["name"]] = values
    if binary is not None and offset != len(binary):
        raise BadRequest(f"{len(binary) - offset} bytes after the last binary tensor (check each input's "
                         "parameters.binary_data_size and Inference-Header-Content-Length)")
    outputs = req.get("outputs")
    requested, binary_out = None, set()
    if outputs is not None:
        if not isinstance(outputs, list):
            raise BadRequest(f"'outputs' must be a list of objects, got {_kind(outputs)}")
        requested = []
        for o in outputs:
            if not isinstance(o, dict) or not isinstance(o.get("name"), str):
                raise BadRequest("each requested output needs a name (a string)")
            requested.append(o["name"])
            if _flag(_parameters(o, f"output {o['name']!r}"), "binary_data", f"output {o['name']!r}"):
                binary_out.add(o["name"])
    if _flag(params, "binary_data_output", "request"):
        binary_out.add("*")
    matrix = to_matrix(tensors, model)
    return InferRequest(rid, matrix, binary_out, requested)


def _loads(head: bytes) -> Any:
    """The request's JSON. ``NaN``, ``Infinity`` and ``-Infinity`` are taken too: they are not JSON, but they are
    what tritonclient (Python's json) writes for those values with binary_data=False."""
    try:
        return orjson.loads(head)
    except orjson.JSONDecodeError as exc:
        error = exc
    if b"NaN" in head or b"Infinity" in head:
        import json

        # Python's json takes more than orjson refused: only the three literals are let through. A number that
        # overflows (1e400, an integer of 400 digits) or a lone surrogate (which no reply could hold) is still
        # the invalid JSON it was, wherever NaN appears in the body.
        try:
            value = json.loads(head, parse_float=_finite_float, parse_int=_finite_int)
            orjson.dumps(value)  # every string is valid Unicode
            return value
        except (ValueError, RecursionError, TypeError, OverflowError):
            pass
    raise BadRequest(f"body is not valid JSON: {error}") from None


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"{text[:20]} is out of the float range")
    return value


def _finite_int(text: str) -> int | float:
    value = int(text)
    if abs(value) >= 2**64:  # as orjson reads such an integer: a float, refused when out of range
        return _finite_float(text)
    return value


def _model_values(model: Model, j: int, values: np.ndarray) -> np.ndarray:
    """Feature ``j``'s tensor values -> what predict takes, through the conversion every mode uses
    (``scoring.model_values``): a pandas-categorical feature's values mapped through its category list
    (numbers matched as numbers, unknown values missing), a ``categorical_feature`` integer code used as is."""
    name = model.feature_names[j]
    cats = model.categorical.get(j)
    if values.dtype == object and cats is None:
        raise BadRequest(f"input {name!r}: BYTES only for features with a category list; send numbers")
    if values.dtype != object and cats and all(isinstance(c, str) for c in cats):
        # A number cannot be one of these categories; taking it as a code would be a guess, so refuse it.
        raise BadRequest(f"input {name!r}: the categories of this feature are text ({cats[:3]!r}...); "
                         "send them as BYTES")
    reasons: dict[int, str] = {}
    try:
        out = model_values(model, j, values.tolist() if values.dtype == object else values, reasons)
    except InputError as exc:
        raise BadRequest(f"input {name!r}: {exc}") from None
    if reasons:
        raise BadRequest(f"input {name!r}, row {min(reasons)}: {reasons[min(reasons)]}")
    return out


def to_matrix(tensors: dict[str, np.ndarray], model: Model) -> np.ndarray:
    """Input tensors by name (each [N] or [N, k]: float64, or object (str) for BYTES) -> the model's matrix:
    one [N, n_features] tensor in feature order, or one tensor per feature; every mistake a ``BadRequest``."""
    names = model.feature_names
    if len(tensors) == 1:
        (name, values), = tensors.items()
        if values.ndim == 2 and name not in names:
            if values.shape[1] != len(names):
                raise BadRequest(f"input {name!r} has {values.shape[1]} columns; the model takes {len(names)}")
            if values.dtype == object:
                raise BadRequest(f"input {name!r}: an [N, {len(names)}] tensor must be numbers; send BYTES "
                                 "categories as one [N] tensor per feature")
            matrix = np.array(values, dtype=np.float64, order="C")
            for j, cats in model.categorical.items():
                if cats is not None:
                    matrix[:, j] = _model_values(model, j, np.ascontiguousarray(matrix[:, j]))
            return matrix
    missing = [n for n in names if n not in tensors]
    unknown = [n for n in tensors if n not in set(names)]
    if unknown and not missing:
        raise BadRequest(f"unknown input(s) {unknown[:10]}: the model's features are {names[:10]}"
                         f"{'...' if len(names) > 10 else ''}")
    if missing:
        raise BadRequest(f"send one [N, {len(names)}] tensor, or one [N] tensor per feature; missing {missing[:10]}"
                         + (f"; unknown input(s) {unknown[:10]}" if unknown else ""))
    for name in names:
        values = tensors[name]
        if values.ndim == 2 and values.shape[1] != 1:
            raise BadRequest(f"input {name!r}: shape must be [N] or [N, 1] for a per-feature tensor, "
                             f"got {list(values.shape)}")
    rows = {tensors[n].shape[0] for n in names}
    if len(rows) != 1:
        raise BadRequest(f"per-feature tensors have different lengths {sorted(rows)}")
    matrix = np.empty((rows.pop(), len(names)), dtype=np.float64)
    for j, name in enumerate(names):
        matrix[:, j] = _model_values(model, j, tensors[name].reshape(-1))
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


def metadata(model: Model, name: str, versions: list[str]) -> dict:
    """OIP model metadata of ``model``; ``versions`` are all the versions this server serves under ``name``."""
    inputs = []
    for j, feature in enumerate(model.feature_names):
        cats = model.categorical.get(j)
        inputs.append({"name": feature, "datatype": "BYTES" if cats else "FP64", "shape": [-1]})
    outs = [{"name": k, "datatype": d, "shape": [-1] + s[1:]} for k, (d, s, _) in
            outputs(np.zeros((0, model.num_class) if model.multiclass else 0), model).items()]
    return {"name": name, "versions": list(versions), "platform": "lightgbm", "inputs": inputs, "outputs": outs,
            "parameters": {"matrix_input": f"or one FP32/FP64 tensor of shape [-1, {len(model.feature_names)}] "
                                           "with the features in this order"}}
