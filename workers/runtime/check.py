"""``scoring-worker check``: settings, model, broker, topics, sink; one line each, exit 0 or 1.

Usable by a person and as a startup/liveness probe (it connects, then exits).
"""

from __future__ import annotations

import logging
import os

import click

from workers.errors import ScoringError, SinkError
from workers.settings import Settings, redact


def _line(ok: bool, what: str, detail: str) -> bool:
    click.echo(f"{'ok  ' if ok else 'FAIL'} {what}: {' '.join(detail.split())}")  # one line, whatever the driver says
    return ok


def run_checks(settings: Settings) -> int:
    """One line per check (settings, model(s), broker and topics, sink, shadow sink); 0 when all pass.
    Creates nothing: no database, folder or topic."""
    from workers.scoring.model import load_model

    results = [_line(True, "settings", "valid")]
    try:
        if settings.routing.path:
            from workers.scoring.build import build_router

            router = build_router(settings)
            for v in router.versions:
                results.append(_line(True, "model", f"{redact(v.model.source)} version {v.name} ({v.role}"
                                                    f"{'' if v.shadow else f', weight {v.weight}'}), "
                                                    f"{len(v.model.feature_names)} features"))
        else:
            model = load_model(settings.model, settings.s3, settings.mlflow)
            results.append(_line(True, "model", f"{redact(model.source)} version {model.version}, "
                                                f"{len(model.feature_names)} features"))
    except ScoringError as exc:
        results.append(_line(False, "model", str(exc)))
    if settings.stream.topics:
        from confluent_kafka import KafkaException
        from confluent_kafka.admin import AdminClient

        from workers.kafka_tls import reach

        try:
            config: dict = {**settings.kafka.librdkafka_config(), "logger": logging.getLogger("workers.kafka")}
            admin = AdminClient(config)
            known = reach(admin, settings.kafka).topics  # a TLS mistake names its setting (workers.kafka_tls)
            results.append(_line(True, "broker", settings.kafka.bootstrap_servers))
            missing = [t for t in settings.stream.topics if t not in known]
            results.append(_line(not missing, "topics", f"missing {missing}" if missing else
                                 ", ".join(settings.stream.topics)))
        except KafkaException as exc:  # a property librdkafka refuses
            reason = exc.args[0].str() if exc.args else str(exc)
            results.append(_line(False, "broker", f"{settings.kafka.bootstrap_servers}: {reason}"))
        except ScoringError as exc:  # the TLS files, a certificate, the protocol, or not reachable
            results.append(_line(False, "broker", str(exc)))
    if settings.stream.topics or not settings.batch.output:
        sinks = [("sink", settings.stream.sink, "SCORING_STREAM__SINK", False)]
    else:  # a batch output must keep the ledger too, as batch mode refuses it at start-up otherwise
        sinks = [("sink", settings.batch.output, "SCORING_BATCH__OUTPUT", True)]
    if settings.routing.shadow_sink:
        sinks.append(("shadow sink", settings.routing.shadow_sink, "SCORING_ROUTING__SHADOW_SINK", False))
    for what, target, setting, ledger in sinks:
        try:
            results.append(_line(True, what, check_sink(target, settings, setting, ledger)))
        except ScoringError as exc:
            results.append(_line(False, what, str(exc)))
    return 0 if all(results) else 1


def check_sink(uri: str, settings: Settings, setting: str, ledger: bool = False) -> str:
    """Reach the sink at ``uri`` without creating anything (a probe must leave no file behind): a SQLite
    database or a local Parquet folder that does not exist yet passes when its nearest existing folder is
    writable, as the worker will create it. With ``ledger``, a sink that cannot keep the batch ledger fails
    (ConfigError naming ``setting``, as batch mode says at start-up). Returns the line to show; raises
    ScoringError."""
    from workers.sinks import open_sink, sink_scheme

    scheme = sink_scheme(uri, setting)  # the sinks' own parsing: a URI urllib refuses is a FAIL line, no traceback
    if scheme == "sqlite":
        return _check_sqlite(uri, setting)
    if scheme in ("", "file"):
        path = uri.removeprefix("file://")
        if not os.path.exists(path):
            return _creatable(path, redact(uri), "folder")
    sink = open_sink(uri, settings.s3, setting=setting, kafka=settings.kafka,
                     registry=settings.schema_registry, iceberg=settings.iceberg)
    try:
        if ledger:  # folders and SQLite databases (checked above without opening) always keep one
            from workers.runtime.batch import batch_ledger

            batch_ledger(sink, setting)
        sink.check()
    finally:
        sink.close()
    return redact(sink.name)


def _check_sqlite(uri: str, setting: str) -> str:
    import sqlite3

    from workers.sinks.sqlite import sqlite_location
    from workers.tools.compare import open_sqlite_readonly

    path, table = sqlite_location(uri)
    name = f"sqlite:///{path}?table={table}"
    if path and not os.path.exists(path):
        return _creatable(path, name, "database")
    conn = open_sqlite_readonly(uri, setting)
    try:
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.Error as exc:
        raise SinkError(f"cannot use {name}: {exc}") from None
    finally:
        conn.close()
    return name


def _creatable(path: str, name: str, kind: str) -> str:
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise SinkError(f"cannot create {name}: {parent} is not a writable folder")
    return f"{name} (the {kind} does not exist yet; the worker will create it under {parent})"
