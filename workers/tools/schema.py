"""JSON Schema for input records, derived from the model (``scoring-worker schema``), and the check of a
producer's schema against the model (``schema --check``: one line per mismatch, exit 1 when records shaped like
it would be rejected; warnings alone exit 0).
"""

from __future__ import annotations

import re
from typing import Any

import click
import orjson

from workers.errors import ConfigError
from workers.scoring.model import Model
from workers.settings import Settings

DRAFT = "https://json-schema.org/draft/2020-12/schema"


def input_schema(model: Model, id_field: str = "id", passthrough: list[str] | None = None) -> dict:
    """The contract a producer can validate against before publishing: id, each feature with its type,
    categorical features with their categories, null allowed (missing). Other fields are allowed and ignored."""
    props: dict[str, dict] = {id_field: {"type": ["string", "integer"], "minLength": 1, "maxLength": 1024,
                                         "description": "Record id; with the model version it keys the result."}}
    for j, name in enumerate(model.feature_names):
        if j in model.categorical:
            cats = model.categorical[j]
            if cats:
                props[name] = {"enum": [*cats, None],
                               "description": "Categorical feature; null (or an unseen category) is missing."}
            else:
                props[name] = {"type": ["integer", "null"], "description": "Categorical feature as integer code."}
        else:
            props[name] = {"type": ["number", "null"], "description": "Numeric feature; null is missing."}
    for name in passthrough or []:
        props.setdefault(name, {"description": "Copied unchanged into the result."})
    return {
        "$schema": DRAFT,
        "$id": f"urn:scoring-workers:input:{model.version}",
        "title": f"Input record for model {model.version}",
        "type": "object",
        "required": [id_field],
        "properties": props,
        "additionalProperties": True,
    }


def _types(prop: dict) -> set[str]:
    t = prop.get("type")
    types = set(t) if isinstance(t, list) else {t} if isinstance(t, str) else set()
    if "enum" in prop:
        types |= {"null" if v is None else "string" if isinstance(v, str) else "boolean" if isinstance(v, bool)
                  else "integer" if isinstance(v, int) else "number" for v in prop["enum"]}
    for key in ("anyOf", "oneOf"):
        for sub in prop.get(key, []):
            types |= _types(sub)
    return types


def check_producer(schema: dict, model: Model, id_field: str = "id") -> tuple[list[str], list[str]]:
    """Compare a producer's JSON Schema with what the model needs: (errors, warnings), one line each.

    Errors: records shaped like this will be rejected (missing id, a numeric feature typed as text, ...).
    Warnings: they will be scored, but worse than the producer may think (a feature never sent is missing
    on every record; categories the model has not seen are missing)."""
    from workers.decode.records import RecordDecoder

    decoder = RecordDecoder(model, id_field)
    props = schema.get("properties") or {}
    required = set(schema.get("required") or [])
    errors, warnings = [], []
    if id_field not in props:
        errors.append(f"id field '{id_field}' is not in the producer's schema")
    else:
        bad = _types(props[id_field]) - {"string", "integer"}
        if bad and _types(props[id_field]):
            errors.append(f"id field '{id_field}' may be {sorted(bad)}; it must be a string or integer")
        if id_field not in required:
            warnings.append(f"id field '{id_field}' is not required: records without it are dead-lettered")
    for j, name in enumerate(model.feature_names):
        prop = props.get(name)
        if prop is None:
            warnings.append(f"feature '{name}' is not in the producer's schema: missing (null) on every record")
            continue
        types = _types(prop)
        cats = model.categorical.get(j) if j in model.categorical else False
        if cats:
            # What the record decoder maps (a category as text or number, in either spelling) or treats as
            # unseen; booleans, lists and objects it dead-letters.
            allowed = {"string", "integer", "number", "null"}
            unseen = [v for v in prop.get("enum", []) if v is not None and decoder.category_code(j, v) is None]
            if unseen:
                warnings.append(f"feature '{name}': categories {unseen[:10]} are unknown to the model (missing)")
        else:
            allowed = {"number", "integer", "null"}
        wrong = types - allowed
        if wrong:
            errors.append(f"feature '{name}' may be {sorted(wrong)}; the model needs "
                          f"{'a category' if cats else 'a number'} or null (such records are dead-lettered)")
    return errors, warnings


def run_schema(settings: Settings, producer: str | None, fmt: str = "jsonschema") -> int:
    """Print the model's input schema, or check ``producer`` (a JSON Schema file, or ``registry:SUBJECT[/VERSION]``:
    a subject's schema from the Schema Registry, any of its formats); the exit code."""
    from workers.scoring.model import load_model

    model = load_model(settings.model, settings.s3, settings.mlflow)
    if producer:
        origin = producer
        if producer.startswith("registry:"):
            from workers.tools.schemaregistry import fetch

            theirs, origin = fetch(settings.schema_registry, producer)
        else:
            try:
                with open(producer, "rb") as fh:
                    theirs = orjson.loads(fh.read())
            except (OSError, orjson.JSONDecodeError) as exc:
                raise ConfigError("--check", f"cannot read {producer} as JSON: {exc}") from None
        _object_schema(theirs, origin)
        errors, warnings = check_producer(theirs, model, settings.scoring.id_column)
        for line in errors:
            click.echo(f"error: {line}")
        for line in warnings:
            click.echo(f"warning: {line}")
        click.echo(f"{origin}: {len(errors)} error(s), {len(warnings)} warning(s) against {model.version}")
        return 1 if errors else 0
    if fmt == "avro":
        click.echo(orjson.dumps(avro_input_schema(model, settings.scoring.id_column, settings.scoring.passthrough),
                                option=orjson.OPT_INDENT_2).decode())
        return 0
    if fmt == "protobuf":
        click.echo(proto_input_schema(model, settings.scoring.id_column, settings.scoring.passthrough))
        return 0
    schema = input_schema(model, settings.scoring.id_column, settings.scoring.passthrough)
    click.echo(orjson.dumps(schema, option=orjson.OPT_INDENT_2).decode())
    return 0


def _object_schema(schema: Any, origin: str) -> None:
    """ConfigError unless ``schema`` is shaped like a JSON Schema of an object (what `schema --check` reads)."""
    problem = None
    if not isinstance(schema, dict):
        problem = f"it is a JSON {type(schema).__name__}, not an object"
    elif not isinstance(schema.get("properties", {}), dict):
        problem = "'properties' is not an object"
    elif not all(isinstance(v, dict | bool) for v in schema.get("properties", {}).values()):
        problem = "a property's schema is not an object"
    elif not isinstance(schema.get("required", []), list):
        problem = "'required' is not a list"
    if problem:
        raise ConfigError("--check", f"{origin} is not a JSON Schema of records: {problem}")


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _fields(model: Model, id_field: str, passthrough: list[str] | None) -> list[tuple[str, str]]:
    """(name, kind: string|double|long) of the input fields, for the Avro and Protobuf forms; ConfigError naming
    --format when a name cannot be an Avro or Protobuf field name."""
    out = [(id_field, "string")]
    for j, name in enumerate(model.feature_names):
        cats = model.categorical.get(j) if j in model.categorical else None
        out.append((name, "double" if j not in model.categorical else ("string" if cats else "long")))
    out += [(n, "string") for n in passthrough or [] if n not in {f for f, _ in out}]
    bad = [n for n, _ in out if not _NAME.fullmatch(n)]
    if bad:
        raise ConfigError("--format", f"{bad[0]!r} cannot be an Avro or Protobuf field name (letters, digits, '_'); "
                                      "use --format jsonschema")
    return out


def avro_input_schema(model: Model, id_field: str = "id", passthrough: list[str] | None = None) -> dict:
    """The input contract as an Avro record: id required, every other field optional (null is missing);
    categories as strings (the symbols of an Avro enum must be names, categories need not be)."""
    fields: list[dict[str, Any]] = [{"name": id_field, "type": "string"}]
    fields += [{"name": n, "type": ["null", k], "default": None}
               for n, k in _fields(model, id_field, passthrough)[1:]]
    return {"type": "record", "name": "Input", "namespace": "scoring_workers", "doc": f"model {model.version}",
            "fields": fields}


def proto_input_schema(model: Model, id_field: str = "id", passthrough: list[str] | None = None) -> str:
    """The input contract as a .proto file (proto3, message Input; ``optional`` keeps null as missing)."""
    lines = [f"// Input record for model {model.version}", 'syntax = "proto3";', "", "package scoring_workers;", "",
             "message Input {"]
    types = {"string": "string", "double": "double", "long": "int64"}
    for number, (name, k) in enumerate(_fields(model, id_field, passthrough), 1):
        lines.append(f"  {'' if number == 1 else 'optional '}{types[k]} {name} = {number};")
    return "\n".join([*lines, "}"])
