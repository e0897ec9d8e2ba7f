"""Batch mode fed by a queue: Kafka events name the files to score (KEDA ScaledJob).

Each event's value is a path or URI (``s3://bucket/key.parquet``), as text or as JSON ``{"path": ...}``
(also ``uri``, ``key`` with ``bucket``). For each event, in order: score the file into the sink (the same
per-file unit and ledger as listed inputs), then commit the event's offset. A crash re-delivers at most
the events after the last commit, and the ledger skips files already finished. The run ends when no
event arrives for ``idle_exit_s`` after the group assigned partitions: the queue is drained.

A file's results are named by its canonical location, as in listed batch runs, so a file queued and the
same file listed share one output and one ledger entry. A queued file inside an output fails alone.

The consumer is librdkafka (confluent-kafka), configured like the stream source (``librdkafka_config``: TLS,
SASL), so every Kafka client at run time has one set of semantics.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import orjson
import pyarrow.fs as pafs
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from workers.errors import InputError, ScoringError, SinkError
from workers.kafka_tls import reach
from workers.runtime.batch import BatchReport, open_batch_sink, output_places, score_file
from workers.runtime.progress import Progress
from workers.scoring.build import build_router
from workers.settings import Settings
from workers.sources.parquet import InputFile
from workers.sources.units import Unit
from workers.storage import canonical, inside, redact, resolve

if TYPE_CHECKING:
    from workers.scoring.router import Router
    from workers.sinks.base import Ledger, Sink

log = logging.getLogger("workers.batch")


def event_path(value: bytes | None) -> str:
    """The file an event names; raises InputError when it names none."""
    if not value:
        raise InputError("empty event")
    text = value.decode("utf-8", errors="replace").strip()
    if text.startswith("{"):
        try:
            obj: Any = orjson.loads(text)
        except orjson.JSONDecodeError:
            raise InputError(f"event is not valid JSON: {text[:80]!r}") from None
        path = obj.get("path") or obj.get("uri")
        if not path and obj.get("bucket") and obj.get("key"):
            path = f"s3://{obj['bucket']}/{obj['key']}"
        if not isinstance(path, str) or not path:
            raise InputError(f"event names no file (expected 'path', 'uri' or 'bucket'+'key'): {text[:80]!r}")
        return path
    return text


def consumer_config(settings: Settings) -> dict[str, Any]:
    b, s = settings.batch, settings.stream
    return {
        **settings.kafka.librdkafka_config(),
        "group.id": b.queue_group,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "session.timeout.ms": s.session_timeout_ms,
        "heartbeat.interval.ms": s.heartbeat_interval_ms,
        # One file can take long to score: allow it between polls.
        "max.poll.interval.ms": max(s.max_poll_interval_ms, 600_000),
        # Events are one line each and a file takes seconds: prefetch little, so a rebalance drops little.
        "queued.min.messages": 10,
        # A queue topic created after start-up is seen within seconds (librdkafka's default is 5 minutes).
        "topic.metadata.refresh.interval.ms": 3000,
    }


def run_batch_queue(settings: Settings) -> BatchReport:
    b = settings.batch
    router = build_router(settings)
    sink, ledger = open_batch_sink(settings)  # a sink without a ledger stops here, before any event is read
    report = BatchReport(output=redact(b.output or ""), allow_bad_rows=b.allow_bad_rows)
    progress = Progress("log" if b.progress == "auto" else b.progress, 0, 0)
    consumer = _connect(settings)
    started = time.monotonic()
    idle_since: float | None = None
    warned: set[str] = set()
    try:
        sink.check()
        consumer.subscribe([b.queue_topic or ""])
        while True:
            msg = consumer.poll(0.5)
            err = msg.error() if msg is not None else None
            if err is not None:
                _warn_once(err, warned)
                msg = None
            if msg is None:
                if consumer.assignment():
                    idle_since = idle_since or time.monotonic()
                    if time.monotonic() - idle_since >= b.idle_exit_s:
                        break
                elif time.monotonic() - started > max(b.idle_exit_s, 60) * 3:
                    break  # never got partitions: nothing for this Job to do
                continue
            idle_since = None
            _score_event(router, settings, sink, ledger, msg.value(), report, progress, router.fingerprint)
            _commit(consumer, msg)
    except SinkError as exc:
        report.failed.append(("<sink>", str(exc)))
        log.error("sink failed; rerun to resume", extra={"reason": str(exc)})
    finally:
        consumer.close()  # auto-commit is off: closing commits nothing
        progress.close()
        sink.close()
        report.seconds = time.monotonic() - started
    return report


def _connect(settings: Settings) -> Consumer:
    """A consumer of the queue's group that has reached the broker; ScoringError when it cannot."""
    try:
        consumer = Consumer(consumer_config(settings), logger=logging.getLogger("workers.kafka"))
    except KafkaException as exc:  # a property librdkafka refuses (e.g. a CA file it cannot read)
        raise ScoringError(f"Kafka client: {_reason(exc)}") from None
    try:
        reach(consumer, settings.kafka)  # a TLS or protocol mistake names its setting (workers.kafka_tls)
    except ScoringError:
        consumer.close()
        raise
    return consumer


def _commit(consumer: Consumer, msg: Message) -> None:
    """Commit the offset after ``msg``, synchronously: its file's results are stored by now."""
    offset = msg.offset() or 0
    try:
        done = consumer.commit(offsets=[TopicPartition(msg.topic() or "", msg.partition() or 0, offset + 1)],
                               asynchronous=False)
        failed: list[object] = [tp.error for tp in done or [] if tp.error is not None]
    except KafkaException as exc:
        failed = [exc.args[0] if exc.args else exc]
    if failed:
        # The group rebalanced meanwhile (or the broker refused): the new owner sees the event again and the
        # ledger skips the file.
        log.warning("commit failed; the event will be seen again and skipped",
                    extra={"reason": " ".join(str(failed[0]).split())})


def _warn_once(error: KafkaError, warned: set[str]) -> None:
    """A consumer error event (broker down, topic missing): librdkafka retries by itself; say it once."""
    text = error.str()
    if text not in warned:
        warned.add(text)
        log.warning("Kafka consumer error; retrying", extra={"reason": text})


def _reason(exc: KafkaException) -> str:
    err = exc.args[0] if exc.args else None
    return " ".join((err.str() if isinstance(err, KafkaError) else str(exc)).split())


def _score_event(router: Router, settings: Settings, sink: Sink, ledger: Ledger, value: bytes | None,
                 report: BatchReport, progress: Progress, version: str) -> None:
    try:
        path = event_path(value)
        source = canonical(path)
        place = next((p for p in output_places(settings) if inside(source, p.root)), None)
        if place is not None:
            raise InputError(f"{path} is inside the output {redact(place.uri)}: results are never inputs")
        fs, inner = resolve(source, settings.s3)
        info = fs.get_file_info(inner)
        if info.type != pafs.FileType.File:
            raise InputError(f"{path} does not exist")
        f = InputFile(path=inner, rel=path, size=info.size or 0, mtime_ns=info.mtime_ns, source=source)
        report.files_found += 1
        report.files_in_shard += 1
        fingerprint = f"{f.fingerprint};model={version}"
        if ledger.done(f.source) == fingerprint:
            report.files_skipped += 1
            return
        result = score_file(router, fs, Unit(f, f.size), sink, settings.batch.batch_rows, progress)
        ledger.mark_done(f.source, fingerprint, result.scored, result.rejected)
        report.add(result)
        log.info("input done", extra={"input": path, "rows": result.scored, "rejected": result.rejected})
    except (InputError, OSError) as exc:
        name = value.decode("utf-8", errors="replace")[:200] if value else "<empty>"
        report.failed.append((name, str(exc)))
        log.error("input failed", extra={"input": name, "reason": str(exc)})
