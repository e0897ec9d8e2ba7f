"""JSON records (bytes) -> the scorer's feature matrix, with a reason for each record that cannot be scored.

A record is a JSON object with an id field and the model's features by name; other fields are ignored
unless listed for passthrough. Numeric features take JSON numbers or null (missing); categorical
features take the category value (string or integer) the model was trained on, unseen ones are missing.
Decoding happens here, in our loop, never inside a Kafka client deserializer: an exception there would
make the client retry the same message forever.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from operator import itemgetter
from types import ModuleType
from typing import Any

import numpy as np
import pyarrow as pa

from workers.decode.jsonparse import exact_loads, long_number, parse_values
from workers.scoring.features import Features
from workers.scoring.model import Model
from workers.scoring.scorer import to_json
from workers.sinks.tables import json_column

_jsonrows: ModuleType | None
try:  # the native reader of the usual record (workers/decode/_jsonrows.cpp), built by the install
    from workers.decode import _jsonrows
except ImportError:  # pragma: no cover - a build without a compiler: every record takes the Python path
    _jsonrows = None

__all__ = ["MAX_ID_LENGTH", "Decoded", "RecordDecoder", "carry_columns", "exact_loads", "long_number"]

_NUMERIC = frozenset({int, float, type(None)})
MAX_ID_LENGTH = 1024


@dataclass
class Decoded:
    ids: list[str | None]
    features: Features
    passthrough: dict[str, list[Any]] = field(default_factory=dict)
    # parsed objects, for the errors' raw column: read for rows with a reason only (None for a row the native
    # reader took, which has none)
    raw: list[dict | None] = field(default_factory=list)


class RecordDecoder:
    def __init__(self, model: Model, id_field: str = "id", key_as_id: bool = False,
                 passthrough: Sequence[str] = ()):
        self.names = list(model.feature_names)
        self.id_field = id_field
        self.key_as_id = key_as_id
        self.passthrough = list(passthrough)
        # feature index -> {category value -> code}; None-valued entries keep integer codes as they are.
        self.categorical: dict[int, dict[Any, float] | None] = {
            i: (None if cats is None else {v: float(c) for c, v in enumerate(cats)})
            for i, cats in model.categorical.items()
        }
        self.numeric_only = not self.categorical
        # obj -> its feature values in order (KeyError when one is missing: then dict.get, in _features_of)
        self._getter: Any = (itemgetter(*self.names) if len(self.names) > 1 else
                             (lambda obj, name=self.names[0]: (obj[name],)) if self.names else (lambda obj: ()))
        # Whether a feature's categories are numbers: then "5" and 5.0 are the category 5, and for text
        # categories 5 is "5", as the Arrow path (scoring.model_values) matches them.
        self.numeric_categories = {i: bool(cats) and all(type(c) in (int, float) for c in cats)
                                   for i, cats in model.categorical.items() if cats is not None}
        self.names_tuple = tuple(self.names)
        try:  # names the native reader can compare with a record's UTF-8 text (a lone surrogate cannot be one)
            for name in (*self.names, id_field):
                name.encode()
            self._utf8_names = len(set(self.names)) == len(self.names)
        except UnicodeEncodeError:
            self._utf8_names = False

    @property
    def native(self) -> bool:
        """Whether JSON records go through the native reader first: numeric features only (categories are
        mapped in Python), no passthrough (those values are Python objects anyway), distinct feature names and
        an id field that UTF-8 can spell."""
        return _jsonrows is not None and self.numeric_only and not self.passthrough and self._utf8_names

    def category_code(self, j: int, v: Any) -> float | None:
        """The code of value ``v`` of pandas-categorical feature ``j``, or None (an unseen category)."""
        if isinstance(v, bool) or not isinstance(v, str | int | float):
            return None
        code = (self.categorical[j] or {}).get(v)
        return code if code is not None else self._other_spelling(j, v)

    def _other_spelling(self, j: int, v: Any) -> float | None:
        """The code of a category value written as the other kind (a number as text, or text as a number)."""
        mapping = self.categorical[j] or {}
        if self.numeric_categories[j]:
            if type(v) is str:
                try:
                    return mapping.get(float(v))
                except ValueError:
                    return None
            return None
        if type(v) is int:
            return mapping.get(str(v))
        if type(v) is float:
            return mapping.get(str(int(v)) if v.is_integer() else repr(v))
        return None

    def _reason_for(self, row: list[Any]) -> str | None:
        """Slow path: find what is wrong in a row whose values are not all numbers or null."""
        for j, v in enumerate(row):
            t = type(v)
            if t in _NUMERIC and t is not bool:
                continue
            mapping = self.categorical.get(j, False)
            if mapping is not False and mapping is not None and isinstance(v, str | int) and t is not bool:
                continue
            shown = to_json(v)[:60] if not isinstance(v, bytes) else repr(v)[:60]  # never raises (ints > 64 bits)
            return f"feature '{self.names[j]}': expected a number, got {type(v).__name__} {shown}"
        return None

    def decode(self, values: Sequence[bytes | None], keys: Sequence[bytes | None] | None = None,
               parsed: tuple[list[Any], dict[int, str]] | None = None, from_json: bool = False) -> Decoded:
        """``values`` as JSON records, or, with ``parsed``, the objects already read from them with the reasons
        of those that could not be: by a wire format (``workers.decode.wire``: Avro, Protobuf, JSON Schema), or
        with ``from_json`` by ``jsonparse.parse_values`` (a router with several decoders parses a batch once)."""
        if parsed is None and self.native_for(values, keys):
            assert _jsonrows is not None
            spelled, field_ = self.names_tuple, self.id_field
            return self.decode_rows(values, keys, lambda v, k, out: _jsonrows.rows(v, k, spelled, field_,
                                                                                 MAX_ID_LENGTH, out),
                                    parse_values, from_json=True)
        n = len(values)
        width = len(self.names)
        flat: list[Any] = []  # n * width feature values, row after row
        ids: list[str | None] = []
        passthrough: dict[str, list[Any]] = {name: [] for name in self.passthrough}
        nan_row = [None] * width
        id_field = self.id_field
        extend, append_id = flat.extend, ids.append
        features_of, getter, names = self._features_of, self._getter, self.names
        where = "" if parsed is not None and not from_json else "JSON "
        objs, given = parsed if parsed is not None else parse_values(values)
        reasons: dict[int, str] = dict(given)
        raw: list[dict | None] = list(objs)
        key_as_id = self.key_as_id and keys is not None
        for i, obj in enumerate(objs):
            if type(obj) is dict and i not in given:
                rid = obj.get(id_field)
                if type(rid) is str and 0 < len(rid) <= MAX_ID_LENGTH:  # the usual record: no other check
                    try:
                        extend(getter(obj))
                    except KeyError:  # a feature the record lacks: missing (None), as dict.get gives
                        extend(map(obj.get, names))
                    append_id(rid)
                    continue
                rid, reason = self._id_of(rid, keys[i] if key_as_id else None)  # type: ignore[index]
                if reason is None:
                    extend(features_of(obj))
                else:
                    reasons[i] = reason
                    extend(nan_row)
                append_id(rid)
                continue
            if i not in given:
                reasons[i] = f"{where}{type(obj).__name__} where an object was expected"
                raw[i] = None
            extend(nan_row)
            append_id(None)
        if passthrough:
            for name, col in passthrough.items():
                col.extend(obj.get(name) if obj is not None else None for obj in raw)
        # Fast path: one pass over every value's type. Only a batch holding something other than numbers and
        # nulls (a category, a bool, a string) goes row by row.
        if not self.numeric_only or not _NUMERIC.issuperset(set(map(type, flat))):
            self._check_rows(flat, width, reasons)
        matrix = np.array(flat, dtype=np.float64).reshape(n, width) if n else np.empty((0, width))
        return Decoded(ids, Features(matrix, reasons), passthrough, raw)

    def native_for(self, values: Sequence[bytes | None], keys: Sequence[bytes | None] | None) -> bool:
        """Whether this batch can go through a native reader (``native``, and keys beside every value when they
        stand in for ids)."""
        return self.native and (keys is None or not self.key_as_id or len(keys) == len(values))

    def decode_rows(self, values: Sequence[bytes | None], keys: Sequence[bytes | None] | None,
                    read: Callable[[Sequence[bytes | None], list[bytes | None] | None, np.ndarray],
                                   tuple[list[str | None], list[int]]],
                    parse: Callable[[Sequence[bytes | None]], tuple[list[Any], dict[int, str]]],
                    from_json: bool) -> Decoded:
        """A native reader (``read``: _jsonrows.rows, _avrorows.rows) takes every usual record (numbers or
        nulls as features, a usable id) straight into the matrix; the others ("slow": anything it does not
        accept) are parsed by ``parse`` and decoded here by the Python path, which gives them what it always
        gave: values, categories or a reason. Their raw objects are kept for the errors' raw column; a usual
        record has no reason, so it needs none."""
        n, width = len(values), len(self.names)
        matrix = np.full((n, width), np.nan)
        given_keys = list(keys) if self.key_as_id and keys is not None else None
        ids, slow = read(values, given_keys, matrix)
        reasons: dict[int, str] = {}
        raw: list[dict | None] = [None] * n
        if slow:
            some = [values[i] for i in slow]
            rest = self.decode(some, None if given_keys is None else [given_keys[i] for i in slow],
                               parsed=parse(some), from_json=from_json)
            matrix[slow] = rest.features.matrix
            for k, i in enumerate(slow):
                ids[i] = rest.ids[k]
                raw[i] = rest.raw[k]
            reasons = {slow[k]: reason for k, reason in rest.features.reasons.items()}
        return Decoded(ids, Features(matrix, reasons), {}, raw)

    def _features_of(self, obj: dict) -> Any:
        """The feature values of one object in the model's order, None where a name is missing."""
        try:
            return self._getter(obj)
        except KeyError:  # a feature the record lacks: missing (None), as dict.get gives
            return map(obj.get, self.names)

    def _id_of(self, rid: Any, key: bytes | None) -> tuple[str | None, str | None]:
        """(id, reason) of a record whose id field is not plain text of 1 to MAX_ID_LENGTH characters: the message
        key stands in for a missing one (``key``: given with key_as_id), an integer becomes its text; reason None
        when the record has a usable id. The id is kept (text) beside a reason, for the dead letter."""
        id_field = self.id_field
        if rid is None and key is not None:
            try:
                rid = key.decode("utf-8")
            except UnicodeDecodeError:
                return None, "message key is not UTF-8 text"
        if rid is None:
            return None, f"missing id field '{id_field}'"
        if type(rid) is int:
            return str(rid), None
        if type(rid) is not str:
            return None, f"id field '{id_field}' must be a string or integer, got {type(rid).__name__}"
        if not rid or len(rid) > MAX_ID_LENGTH:
            return rid, f"id field '{id_field}' must have 1 to {MAX_ID_LENGTH} characters"
        return rid, None

    def _check_rows(self, flat: list[Any], width: int, reasons: dict[int, str]) -> None:
        """Slow path: a reason for each row holding a value that is not a number, null or known category;
        categories replaced by their codes; bad rows blanked."""
        for i in range(len(flat) // width):
            if i in reasons:
                continue
            row = flat[i * width:(i + 1) * width]
            reason = None
            if Decimal in map(type, row):  # Avro's decimal logical type: a number (float64, as every feature is)
                row = [float(v) if type(v) is Decimal else v for v in row]
                flat[i * width:(i + 1) * width] = row
            if not _NUMERIC.issuperset(map(type, row)):
                reason = self._reason_for(row)
            if reason is None and not self.numeric_only:
                for j, mapping in self.categorical.items():
                    v = row[j]
                    if mapping is not None and v is not None:
                        code = mapping.get(v)
                        flat[i * width + j] = code if code is not None else self._other_spelling(j, v)
            if reason is not None:
                reasons[i] = reason
                flat[i * width:(i + 1) * width] = [None] * width

    @staticmethod
    def passthrough_array(values: list[Any]) -> pa.Array:
        """Arrow array of passthrough values, never an exception: integers from 2**63 up to 2**64 (JSON's
        unsigned 64-bit counters) as uint64; mixed types (and integers out of every 64-bit range) as JSON text
        in an ``arrow.json`` column, which the sinks store as the JSON values themselves (not as strings)."""
        try:
            return pa.array(values)
        except OverflowError:
            if all(v is None or type(v) is int and 0 <= v < 2**64 for v in values):
                return pa.array(values, pa.uint64())
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            pass
        return json_column([None if v is None else to_json(v) for v in values])


def carry_columns(passthrough: dict[str, list[Any]], topics: Sequence[str | None] | None = None,
                  partitions: Sequence[int | None] | None = None, offsets: Sequence[int | None] | None = None,
                  timestamps_ms: np.ndarray | None = None) -> dict[str, pa.Array]:
    """The columns decoded records carry into results and errors, built once for stream and serve: the
    passthrough values, then where each record came from (``topic`` string, ``partition`` int32, ``offset``
    int64; None for an event that came from no Kafka record; ``timestamp`` as UTC milliseconds, a negative
    stamp being none)."""
    carry = {name: RecordDecoder.passthrough_array(values) for name, values in passthrough.items()}
    if topics is not None:
        carry["topic"] = pa.array(topics, pa.string())
        carry["partition"] = pa.array(partitions, pa.int32())
        carry["offset"] = pa.array(offsets, pa.int64())
    if timestamps_ms is not None:
        carry["timestamp"] = pa.array(timestamps_ms, pa.timestamp("ms", tz="UTC"), mask=timestamps_ms < 0)
    return carry
