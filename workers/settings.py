"""Settings: one group per component, read from ``SCORING_<GROUP>__<NAME>`` env vars and CLI flags.

Every field's docstring is its reference text: ``--help`` and the README table come from it.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from workers.errors import ConfigError

ENV_PREFIX = "SCORING_"
_GROUP_CONFIG = ConfigDict(use_attribute_docstrings=True, extra="forbid")


class ModelSettings(BaseModel):
    model_config = _GROUP_CONFIG

    path: str | None = None
    """LightGBM model file in the text format `Booster.save_model` writes: a path, `file://` or `s3://` URI."""
    sha256: str | None = None
    """Pinned SHA-256 (hex) of the model file; when set, a file with another hash is refused before parsing."""
    version: str | None = None
    """Model version written with every result; default: the file stem plus the first 12 hex digits of its SHA-256."""
    threads: int = Field(1, ge=1, le=256)
    """Threads LightGBM uses per predict call. Keep 1 and scale with processes/pods."""


class S3Settings(BaseModel):
    model_config = _GROUP_CONFIG

    endpoint_url: str | None = None
    """S3 endpoint, e.g. `http://127.0.0.1:9000` for MinIO or moto; empty means AWS."""
    access_key_id: str | None = None
    """S3 access key id; empty means the AWS default credential chain."""
    secret_access_key: SecretStr | None = None
    """S3 secret access key (never logged)."""
    region: str = "us-east-1"
    """S3 region."""


class ScoringSettings(BaseModel):
    model_config = _GROUP_CONFIG

    id_column: str = "id"
    """Input column (batch) or JSON field (stream) holding the record id; with the model version it keys each result."""
    passthrough: list[str] = Field(default_factory=list)
    """Input columns copied unchanged into each result (comma-separated on the command line)."""


class BatchSettings(BaseModel):
    model_config = _GROUP_CONFIG

    input: str | None = None
    """Parquet input: a file, a directory, a glob (`data/*.parquet`) or an `s3://bucket/prefix`."""
    output: str | None = None
    """Where results go: a directory or `s3://` prefix (Parquet dataset, one file per input file) or
    `postgresql://user@host:port/db?table=NAME`, or `sqlite:///path.db?table=NAME`."""
    batch_rows: int = Field(65536, ge=1, le=10_000_000)
    """Rows per scoring batch read from a Parquet file; peak memory is about one batch plus one row group."""
    shard_index: int | None = Field(None, ge=0)
    """This pod's shard (0-based). Default: `JOB_COMPLETION_INDEX` (Kubernetes Indexed Job), else 0."""
    shard_count: int = Field(1, ge=1)
    """Number of shards; each input file belongs to exactly one, by a stable hash of its path."""
    allow_bad_rows: bool = False
    """Exit 0 when the only failures were rejected rows (they are in the errors output either way)."""
    progress: Literal["auto", "bar", "log"] = "auto"
    """Progress display: a bar on a terminal, JSON log lines otherwise (`auto`)."""


class Settings(BaseSettings):
    """All settings. Env: `SCORING_<GROUP>__<NAME>`, e.g. `SCORING_MODEL__PATH`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        use_attribute_docstrings=True,
        extra="forbid",
        case_sensitive=False,
    )

    model: ModelSettings = Field(default_factory=ModelSettings)
    s3: S3Settings = Field(default_factory=S3Settings)
    scoring: ScoringSettings = Field(default_factory=ScoringSettings)
    batch: BatchSettings = Field(default_factory=BatchSettings)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Log level of the JSON log lines written to stderr."""



def env_name(path: tuple[str, ...]) -> str:
    """('model', 'path') -> 'SCORING_MODEL__PATH'."""
    return ENV_PREFIX + "__".join(p.upper() for p in path)


def field_for(path: tuple[str, ...]) -> Any:
    """The pydantic FieldInfo of a dotted setting path."""
    model: type[BaseModel] = Settings
    info = None
    for part in path:
        info = model.model_fields[part]
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
    return info


def known_env_names(model: type[BaseModel] = Settings, prefix: tuple[str, ...] = ()) -> set[str]:
    names: set[str] = set()
    for name, info in model.model_fields.items():
        ann = info.annotation
        path = (*prefix, name)
        names.add(env_name(path))
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            names |= known_env_names(ann, path)
    return names


def _check_unknown_env() -> None:
    # pydantic-settings silently ignores SCORING_* variables that match no field; a typo such as
    # SCORING_MODLE__PATH would then run with defaults. Refuse instead.
    known = known_env_names()
    for key in os.environ:
        if key.upper().startswith(ENV_PREFIX) and key.upper() not in known:
            raise ConfigError(key, "unknown setting (see `scoring-worker --help` or the README for the list)")


def load_settings(overrides: dict[str, Any] | None = None) -> Settings:
    """Build the settings from env vars with CLI ``overrides`` (nested dicts) on top.

    Raises ConfigError naming the first wrong setting (env name and, where known, the flag).
    """
    _check_unknown_env()
    try:
        settings = Settings(**(overrides or {}))
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = tuple(str(p) for p in err["loc"] if not isinstance(p, int))
        name = env_name(loc) if loc else "settings"
        value = err.get("input")
        shown = "" if isinstance(value, dict) or "secret" in name.lower() else f" (got {value!r})"
        raise ConfigError(name, f"{err['msg']}{shown}") from None
    b = settings.batch
    if b.shard_index is not None and b.shard_index >= b.shard_count:
        raise ConfigError(
            "SCORING_BATCH__SHARD_INDEX", f"{b.shard_index} must be below SCORING_BATCH__SHARD_COUNT ({b.shard_count})"
        )
    return settings


def reference_rows(model: type[BaseModel] = Settings, prefix: tuple[str, ...] = ()) -> list[tuple[str, str, str]]:
    """(env var, default, description) for every leaf setting: the README's reference table."""
    rows = []
    for name, info in model.model_fields.items():
        ann = info.annotation
        path = (*prefix, name)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows += reference_rows(ann, path)
            continue
        default = info.get_default(call_default_factory=True)
        shown = "" if default is None else (",".join(default) if isinstance(default, list) else str(default))
        rows.append((env_name(path), shown, " ".join((info.description or "").split())))
    return rows
