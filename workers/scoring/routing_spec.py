"""The routing file: which model versions score, with what share of traffic, and which only shadow.

```yaml
key: user_id              # routing key field; default: the id field (SCORING_SCORING__ID_COLUMN)
versions:
  - name: v1              # written as model_version with every result
    model: models/v1.txt  # path, file:// or s3:// URI (relative paths: relative to this file), or models:/NAME@ALIAS,
                          # models:/NAME/VERSION, runs:/RUN_ID/PATH from the MLflow registry (SCORING_MLFLOW__*)
    sha256: 4f0c...       # optional pin; a file with another hash is refused
    weight: 95            # share of traffic; the weights of served versions sum to 100
  - name: v2
    model: models/v2.txt
    weight: 5
    guardrail: {max_error_rate: 0.01, max_score_psi: 0.25, min_records: 1000}
  - name: v3
    model: models/v3.txt
    shadow: true          # scored on every record and stored, never the served result
```
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from workers.errors import ConfigError
from workers.settings import REGISTRY_SCHEMES, readable_uri

SETTING = "SCORING_ROUTING__PATH"


class Guardrail(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_error_rate: float | None = Field(None, ge=0, le=1)
    """Share of this version's rows whose prediction failed or was not a finite number."""
    max_score_psi: float | None = Field(None, gt=0)
    """Population stability index of this version's scores against the primary version's, over the window."""
    max_mean_abs_diff: float | None = Field(None, gt=0)
    """Shadow versions: mean absolute difference from the served score of the same records."""
    min_records: int = Field(1000, ge=1)
    """Rows this version must have scored (in the window) before the rule is judged."""
    window: int = Field(20_000, ge=100)
    """Most recent rows of this version (and of the primary) the rule looks at."""


class VersionSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    model: str = Field(min_length=1)
    sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")

    # Added by H6 (issue #14 case 20): the same schemes as SCORING_MODEL__PATH, so ftp://... is one line, not
    # a pyarrow traceback when the model is read.
    @field_validator("model")
    @classmethod
    def _model_scheme(cls, value: str) -> str:
        return readable_uri(value)
    weight: int | None = Field(None, ge=0, le=100)
    shadow: bool = False
    guardrail: Guardrail | None = None


class RoutingSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key: str | None = None
    versions: list[VersionSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self) -> RoutingSpec:
        names = [v.name for v in self.versions]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"version names must be unique; repeated: {', '.join(dupes)}")
        served = [v for v in self.versions if not v.shadow]
        for v in self.versions:
            if v.shadow and v.weight:
                raise ValueError(f"version {v.name!r} is a shadow and cannot have a weight")
        if not served:
            raise ValueError("at least one version must be served (not shadow)")
        if len(served) == 1 and served[0].weight is None:
            served[0].weight = 100
        missing = [v.name for v in served if v.weight is None]
        if missing:
            raise ValueError(f"served versions need a weight: {', '.join(missing)}")
        total = sum(v.weight or 0 for v in served)
        if total != 100:
            raise ValueError(f"weights of served versions must sum to 100, not {total}")
        return self

    @property
    def served(self) -> list[VersionSpec]:
        return [v for v in self.versions if not v.shadow]

    @property
    def shadows(self) -> list[VersionSpec]:
        return [v for v in self.versions if v.shadow]


def _resolve(model: str, base: Path) -> str:
    if "://" in model or model.startswith(REGISTRY_SCHEMES) or Path(model).is_absolute():
        return model
    return str(base / model)


def parse_routing(text: str, origin: str, base: Path | None = None) -> RoutingSpec:
    """Parse and validate routing text; ConfigError naming the setting and the wrong entry."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(SETTING, f"{origin} is not valid YAML/JSON: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise ConfigError(SETTING, f"{origin} must hold a mapping with a 'versions' list")
    try:
        spec = RoutingSpec.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in err["loc"]).replace(".[", "[")
        msg = err["msg"].removeprefix("Value error, ")
        raise ConfigError(SETTING, f"{origin}: {where + ': ' if where else ''}{msg}") from None
    if base is not None:
        for v in spec.versions:
            v.model = _resolve(v.model, base)
    return spec


def read_routing(path: str) -> tuple[RoutingSpec, str]:
    """(spec, SHA-256 of the file's bytes) of a local routing file (a mounted ConfigMap, say)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(SETTING, f"cannot read {path}: {exc.strerror or exc}") from None
    spec = parse_routing(data.decode("utf-8", errors="replace"), path, Path(path).resolve().parent)
    return spec, hashlib.sha256(data).hexdigest()
