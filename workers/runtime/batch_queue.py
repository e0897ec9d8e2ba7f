"""Batch mode fed by a queue: Kafka events name the files to score (KEDA ScaledJob).

Each event's value is a path or URI (``s3://bucket/key.parquet``), as text or as JSON ``{"path": ...}``
(also ``uri``, ``key`` with ``bucket``). For each event, in order: score the file into the sink (the same
per-file unit and ledger as listed inputs), then commit the event's offset. A crash re-delivers at most
the events after the last commit, and the ledger skips files already finished. The run ends when no
event arrives for ``idle_exit_s`` after the group assigned partitions: the queue is drained.

A file's results are named by its canonical location, as in listed batch runs, so a file queued and the
same file listed share one output and one ledger entry. A queued file inside an output fails alone.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import orjson
import pyarrow.fs as pafs
from kafka import KafkaConsumer, TopicPartition
from kafka.errors import CommitFailedError, KafkaError
from kafka.structs import OffsetAndMetadata

from workers.errors import InputError, ScoringError, SinkError
from workers.runtime.batch import OUTPUT_SETTING, BatchReport, output_places, score_file
from workers.runtime.progress import Progress
from workers.scoring.build import build_router
from workers.settings import Settings
from workers.sinks import open_result_sink
from workers.sources.parquet import InputFile
from workers.storage import canonical, inside, redact, resolve

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


def run_batch_queue(settings: Settings) -> BatchReport:
    b = settings.batch
    router = build_router(settings)
    sink = open_result_sink(settings, b.output or "", OUTPUT_SETTING)
    report = BatchReport(output=redact(b.output or ""), allow_bad_rows=b.allow_bad_rows)
    progress = Progress("log" if b.progress == "auto" else b.progress, 0, 0)
    try:
        consumer = KafkaConsumer(
            b.queue_topic, **settings.kafka.client_config(), group_id=b.queue_group, enable_auto_commit=False,
            auto_offset_reset="earliest", max_poll_records=1,
            session_timeout_ms=settings.stream.session_timeout_ms,
            heartbeat_interval_ms=settings.stream.heartbeat_interval_ms,
            # One file can take long to score: allow it between polls.
            max_poll_interval_ms=max(settings.stream.max_poll_interval_ms, 600_000))
    except KafkaError as exc:
        raise ScoringError(f"cannot reach Kafka at {settings.kafka.bootstrap_servers}: {exc}") from None
    started = time.monotonic()
    idle_since: float | None = None
    try:
        sink.check()
        while True:
            got = consumer.poll(timeout_ms=500, max_records=1)
            if not got:
                if consumer.assignment():
                    idle_since = idle_since or time.monotonic()
                    if time.monotonic() - idle_since >= b.idle_exit_s:
                        break
                elif time.monotonic() - started > max(b.idle_exit_s, 60) * 3:
                    break  # never got partitions: nothing for this Job to do
                continue
            idle_since = None
            for tp, records in got.items():
                for record in records:
                    _score_event(router, settings, sink, record.value, report, progress, router.fingerprint)
                    try:
                        consumer.commit({TopicPartition(tp.topic, tp.partition):
                                         OffsetAndMetadata(record.offset + 1, "", -1)})
                    except CommitFailedError:
                        log.warning("commit failed after a rebalance; the event will be seen again and skipped")
    except SinkError as exc:
        report.failed.append(("<sink>", str(exc)))
        log.error("sink failed; rerun to resume", extra={"reason": str(exc)})
    finally:
        consumer.close(autocommit=False)
        progress.close()
        sink.close()
        report.seconds = time.monotonic() - started
    return report


def _score_event(router, settings, sink, value, report, progress, version) -> None:
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
        if sink.done(f.source) == fingerprint:
            report.files_skipped += 1
            return
        result = score_file(router, fs, f, sink, settings.batch.batch_rows, progress)
        sink.mark_done(f.source, fingerprint, result.ok, result.bad)
        report.add(result)
        log.info("input done", extra={"input": path, "rows": result.ok, "rejected": result.bad})
    except (InputError, OSError) as exc:
        name = value.decode("utf-8", errors="replace")[:200] if value else "<empty>"
        report.failed.append((name, str(exc)))
        log.error("input failed", extra={"input": name, "reason": str(exc)})
