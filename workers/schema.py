"""JSON Schema for input records, derived from the model (``scoring-worker schema``)."""

from __future__ import annotations

from workers.model import Model

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
