"""Upstream CRD openAPIV3Schema -> JSON Schema, strict (misspelled fields fail), for offline validation."""

from __future__ import annotations

from typing import Any

import yaml

_COMBINERS = ("allOf", "anyOf", "oneOf")


def convert(node: Any, strict: bool) -> Any:
    if not isinstance(node, dict):
        return node
    node = dict(node)
    nullable = node.pop("nullable", False)
    if node.pop("x-kubernetes-int-or-string", False):
        out: dict[str, Any] = {"anyOf": [{"type": "integer"}, {"type": "string"}]}
        if nullable:
            out["anyOf"].append({"type": "null"})
        return out
    preserve = node.pop("x-kubernetes-preserve-unknown-fields", False)
    for key in [k for k in node if k.startswith("x-kubernetes-")]:
        node.pop(key)
    if "properties" in node:
        node["properties"] = {k: convert(v, strict) for k, v in node["properties"].items()}
        if strict and not preserve and "additionalProperties" not in node:
            node["additionalProperties"] = False
    if isinstance(node.get("items"), dict):
        node["items"] = convert(node["items"], strict)
    if isinstance(node.get("additionalProperties"), dict):
        node["additionalProperties"] = convert(node["additionalProperties"], strict)
    for key in _COMBINERS:
        if key in node:
            node[key] = [convert(n, strict) for n in node[key]]
    if "not" in node:
        node["not"] = convert(node["not"], strict)
    if nullable and "type" in node:
        node["type"] = [node["type"], "null"]
    return node


def schemas(path: str, strict: bool = True) -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> JSON Schema for every served version in a CRD file."""
    out = {}
    for doc in yaml.safe_load_all(open(path)):
        if not doc or doc.get("kind") != "CustomResourceDefinition":
            continue
        group, kind = doc["spec"]["group"], doc["spec"]["names"]["kind"]
        for version in doc["spec"]["versions"]:
            if not version.get("served"):
                continue
            schema = convert(version["schema"]["openAPIV3Schema"], strict)
            props = schema.setdefault("properties", {})
            api = f"{group}/{version['name']}"
            props["apiVersion"] = {"const": api}
            props["kind"] = {"const": kind}
            props["metadata"] = {"type": "object"}
            schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata"})
            out[(api, kind)] = schema
    return out
