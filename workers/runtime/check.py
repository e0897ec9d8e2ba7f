"""``scoring-worker check``: settings, model, broker, topics, sink; one line each, exit 0 or 1.

Usable by a person and as a startup/liveness probe (it connects, then exits).
"""

from __future__ import annotations

import logging

import click

from workers.errors import ScoringError
from workers.settings import Settings


def _line(ok: bool, what: str, detail: str) -> bool:
    click.echo(f"{'ok  ' if ok else 'FAIL'} {what}: {detail}")
    return ok


def run_checks(settings: Settings) -> int:
    from workers.model import load_model
    from workers.sinks import open_sink

    results = [_line(True, "settings", "valid")]
    try:
        if settings.routing.path:
            from workers.rollout.watch import RoutingSource

            router = RoutingSource(settings).router
            for v in router.versions:
                results.append(_line(True, "model", f"{v.model.source} version {v.name} ({v.role}"
                                                    f"{'' if v.shadow else f', weight {v.weight}'}), "
                                                    f"{len(v.model.feature_names)} features"))
        else:
            model = load_model(settings.model, settings.s3)
            results.append(_line(True, "model", f"{model.source} version {model.version}, "
                                                f"{len(model.feature_names)} features"))
    except ScoringError as exc:
        results.append(_line(False, "model", str(exc)))
    if settings.stream.topics:
        from confluent_kafka import KafkaException
        from confluent_kafka.admin import AdminClient

        try:
            admin = AdminClient({**settings.kafka.librdkafka_config(), "logger": logging.getLogger("workers.kafka")})
            known = admin.list_topics(timeout=10).topics
            results.append(_line(True, "broker", settings.kafka.bootstrap_servers))
            missing = [t for t in settings.stream.topics if t not in known]
            results.append(_line(not missing, "topics", f"missing {missing}" if missing else
                                 ", ".join(settings.stream.topics)))
        except KafkaException as exc:
            reason = exc.args[0].str() if exc.args else str(exc)
            results.append(_line(False, "broker", f"{settings.kafka.bootstrap_servers}: {reason}"))
    uri = settings.stream.sink if settings.stream.topics or not settings.batch.output else settings.batch.output
    try:
        sink = open_sink(uri, settings.s3, kafka=settings.kafka)
        try:
            sink.check()
        finally:
            sink.close()
        results.append(_line(True, "sink", sink.name))
    except ScoringError as exc:
        results.append(_line(False, "sink", str(exc)))
    return 0 if all(results) else 1
