"""Sinks store results; chosen by the URI scheme of the output (a plain dict, nothing self-registers)."""

from __future__ import annotations

from urllib.parse import urlparse

from workers.errors import ConfigError
from workers.settings import S3Settings
from workers.sinks.base import Ledger, Sink, UnitWriter


def _parquet(uri: str, s3: S3Settings, setting: str, **_: object) -> Sink:
    from workers.sinks.parquet import ParquetSink

    return ParquetSink(uri, s3)


def _postgres(uri: str, s3: S3Settings, setting: str, **_: object) -> Sink:
    from workers.sinks.postgres import PostgresSink

    return PostgresSink(uri, setting)


def _sqlite(uri: str, s3: S3Settings, setting: str, **_: object) -> Sink:
    from workers.sinks.sqlite import SqliteSink

    return SqliteSink(uri, setting)


def _mysql(uri: str, s3: S3Settings, setting: str, **_: object) -> Sink:
    from workers.sinks.mysql import MysqlSink

    return MysqlSink(uri, setting)


def _kafka(uri: str, s3: S3Settings, setting: str, kafka: object = None, registry: object = None,
           **_: object) -> Sink:
    from workers.settings import KafkaSettings
    from workers.sinks.kafka import KafkaSink

    return KafkaSink(uri, kafka if isinstance(kafka, KafkaSettings) else KafkaSettings(), setting, registry)


def _redis(uri: str, s3: S3Settings, setting: str, **_: object) -> Sink:
    from workers.sinks.redis import RedisSink

    return RedisSink(uri, setting)


def _delta(uri: str, s3: S3Settings, setting: str, **_: object) -> Sink:
    try:
        from workers.sinks.delta import DeltaSink
    except ImportError as exc:  # a runtime dependency, but an install without it should say so in one line
        raise ConfigError(setting, f"delta+ outputs need the deltalake package (pip install deltalake): {exc}") \
            from None
    return DeltaSink(uri, s3, setting)


def _iceberg(uri: str, s3: S3Settings, setting: str, iceberg: object = None, **_: object) -> Sink:
    from workers.settings import IcebergSettings

    try:
        from workers.sinks.iceberg import IcebergSink
    except ImportError as exc:  # an optional extra: an install without it should say so in one line
        raise ConfigError(setting, "iceberg:// outputs need pyiceberg and SQLAlchemy (pip install "
                                   f"'scoring-workers[iceberg]'): {exc}") from None
    return IcebergSink(uri, s3, iceberg if isinstance(iceberg, IcebergSettings) else IcebergSettings(), setting)


SINKS = {
    "": _parquet,
    "file": _parquet,
    "s3": _parquet,
    "postgresql": _postgres,
    "postgres": _postgres,
    "sqlite": _sqlite,
    "mysql": _mysql,
    "mariadb": _mysql,
    "kafka": _kafka,
    "redis": _redis,
    "rediss": _redis,
    "delta+file": _delta,
    "delta+s3": _delta,
    "iceberg": _iceberg,
}


def open_sink(uri: str, s3: S3Settings, setting: str, **extra: object) -> Sink:
    """The sink of ``uri``; ``setting`` is where the URI came from (no default: a mistake in a stream or serve
    sink must never be reported as SCORING_BATCH__OUTPUT)."""
    try:
        return _open(uri, s3, setting, **extra)
    except ValueError as exc:  # urllib's own refusals (an unclosed '[' is 'Invalid IPv6 URL'): a wrong setting
        from workers.settings import redact

        raise ConfigError(setting, f"cannot read {redact(uri)!r} as a URI: {exc}") from None


def sink_scheme(uri: str, setting: str) -> str:
    """The scheme that chooses the sink of ``uri`` ('' for a plain path); ConfigError naming ``setting`` when
    ``uri`` cannot be read as a URI (urllib refuses an unclosed '[' as 'Invalid IPv6 URL')."""
    try:
        return urlparse(uri).scheme.lower() if "://" in uri else ""
    except ValueError as exc:
        from workers.settings import redact

        raise ConfigError(setting, f"cannot read {redact(uri)!r} as a URI: {exc}") from None


def _open(uri: str, s3: S3Settings, setting: str, **extra: object) -> Sink:
    scheme = sink_scheme(uri, setting)
    factory = SINKS.get(scheme)
    if factory is None:
        known = ", ".join(f"{s}://" for s in sorted(SINKS) if s) + " or a directory"
        from workers.settings import redact  # the URI may hold a password: never print it

        raise ConfigError(setting, f"unknown scheme {scheme!r} in {redact(uri)!r}; use {known}")
    return factory(uri, s3, setting=setting, **extra)


def open_result_sink(settings, uri: str, setting: str) -> Sink:
    """The sink of a mode's results; with ``routing.shadow_sink`` set, shadow rows go there instead."""
    sink = open_sink(uri, settings.s3, setting=setting, kafka=settings.kafka,
                     registry=settings.schema_registry, iceberg=settings.iceberg)
    if not settings.routing.shadow_sink:
        return sink
    from workers.sinks.shadow import SplitSink

    shadow = open_sink(settings.routing.shadow_sink, settings.s3, setting="SCORING_ROUTING__SHADOW_SINK",
                       kafka=settings.kafka, registry=settings.schema_registry, iceberg=settings.iceberg)
    return SplitSink(sink, shadow)


__all__ = ["SINKS", "Ledger", "Sink", "UnitWriter", "open_result_sink", "open_sink", "sink_scheme"]
