"""Stream mode's ordering rules, in process: a real ``StreamWorker`` (decoding, scoring, pipeline, lanes, commit
rules) on ``workers.testing``'s scripted source, sink and dead letters. No broker, no database: each test runs
in well under a second or two. Every commit is checked as it happens (``OrderViolation`` when an offset is
committed before its records are stored or dead-lettered). The broker tests (tests/test_stream*.py) stay as
the integration layer; the rule "records of a partition revoked during a poll are not in the batch", which the
Kafka source keeps, is tested on ``KafkaSource.poll_batch`` itself at the end of this file.

Rules and their tests:
- nothing committed before it is stored ........ every test (check_commit); test_store_failures_are_retried...
- a crash anywhere re-reads from the last commit, each result stored once ........ test_crash_*
- a dropped batch's partitions are excluded from later commits ........ test_a_dropped_batch_*
- a batch whose every partition is revoked while its store is retried is dropped ...... same test
- revoked partitions' records are dropped from the batch in hand ........ test_kafka_source_drops_*
- shutdown is bounded while the store hangs; nothing of the hung batch committed ...... test_shutdown_*
- rows the store refuses are dead-lettered, the partition moves on ........ test_rows_the_store_refuses_*
- on_bad_record=fail stops with exit 1, nothing of the bad batch committed ........ test_on_bad_record_fail_*
"""

from __future__ import annotations

import threading
import time

import pytest

from tests.test_stream import records
from workers.runtime.stream.worker import StreamWorker
from workers.settings import load_settings
from workers.testing import (
    Crash,
    Crashed,
    CrashInStore,
    Rebalance,
    Script,
    SinkFails,
    SinkHangs,
    SinkRefuses,
    rec,
)


def settings_for(models, **stream):
    return load_settings({"model": {"path": models["binary"]}, "stream": {
        "topics": ["t"], "metrics_port": None, "max_records": 10, "max_wait_ms": 5, "retry_backoff_max_s": 0.05,
        "shutdown_timeout_s": 2.0, **stream}})


def worker_on(script: Script, settings, **kw) -> StreamWorker:
    return StreamWorker(settings, source=script.source(), sink=script.sink, dead_letters=script.dead_letters(),
                        burst=True, **kw)


def interleaved(n: int, partitions: int = 2, start: int = 0) -> list:
    """``n`` records, round robin over the partitions of topic t."""
    return [rec("t", i % partitions, r) for i, r in enumerate(records(n, start=start))]


def where(script: Script, r) -> tuple[tuple[str, int], int]:
    """(partition, offset) the script gave record ``r``."""
    tp = (r.topic, r.partition)
    return tp, [m.value() for m in script.logs[tp]].index(r.value)


def assert_everything_once(script: Script, n: int) -> None:
    ids = script.stored_ids()
    assert len(ids) == len(set(ids)) == n - len(script.dead_offsets())
    assert script.committed == {tp: len(log) for tp, log in script.logs.items()}


def test_every_record_is_stored_once_and_committed_after_it_is_stored(models):
    script = Script(interleaved(95))
    worker = worker_on(script, settings_for(models))
    assert worker.run() == 0
    assert_everything_once(script, 95)
    for before, after in zip(script.commits, script.commits[1:], strict=False):  # commits only move forward
        assert all(after[tp] > before.get(tp, -1) for tp in after)
    assert script.sink.writes >= 9  # micro-batches of 10, not one write


def test_store_failures_are_retried_without_committing_then_stored_once(models):
    items = interleaved(40)
    items.insert(15, SinkFails(times=4))  # the batch holding the next record fails four times
    script = Script(items)
    worker = worker_on(script, settings_for(models))
    assert worker.run() == 0
    assert script.sink.failures == 4
    assert worker.metrics.sink_errors._value.get() == 4
    assert_everything_once(script, 40)


def test_crash_while_polling_then_a_new_worker_stores_the_rest_once(models):
    items = interleaved(60)
    items.insert(35, Crash())
    script = Script(items)
    with pytest.raises(Crashed):
        worker_on(script, settings_for(models)).run()
    first = dict(script.committed)
    assert sum(first.values()) < 60  # the crash left work uncommitted
    second = worker_on(script, settings_for(models))
    assert second.run() == 0
    assert_everything_once(script, 60)
    # The second member started from the first one's commits: it re-read nothing below them.
    reread = [(t, p, o) for batch in second.pipeline.source.batches for t, p, o in batch]
    assert reread and all(o >= first.get((t, p), 0) for t, p, o in reread)


def test_crash_inside_the_store_commits_nothing_of_that_batch_and_the_restart_stores_it(models):
    items = interleaved(50)
    items.insert(22, CrashInStore())
    script = Script(items)
    with pytest.raises(Crashed):
        worker_on(script, settings_for(models)).run()
    tp, offset = where(script, items[23])
    assert script.committed.get(tp, 0) <= offset, "an offset past the record whose store crashed was committed"
    assert worker_on(script, settings_for(models)).run() == 0
    assert_everything_once(script, 50)


def test_a_dropped_batch_is_not_committed_past_when_a_later_batch_of_its_partition_is_stored(models):
    """Batch N (t[0] 0-9) fails to store; while it is retried t[0] is revoked (N dropped); t[0] comes back
    (two polls later) before batch N+1 (t[0] 10-19, already in flight) is stored. Committing N+1's offset of t[0] would skip N's
    records, never stored: N+1 must commit nothing of t[0] (the exclude rule), and t[0] is re-read from 0."""
    p0 = [rec("t", 0, r) for r in records(20)]
    p1 = [rec("t", 1, r) for r in records(30, start=100)]
    script = Script([SinkFails(times=1), *p0, Rebalance(revoke=[("t", 0)], in_keep_alive=True), *p1[:20],
                     Rebalance(assign=[("t", 0)]), *p1[20:]])
    worker = worker_on(script, settings_for(models))
    assert worker.run() == 0  # an OrderViolation would be raised out of run() at the wrong commit
    assert script.fired == {0, 1}
    assert_everything_once(script, 50)
    t0 = [c[("t", 0)] for c in script.commits if ("t", 0) in c]
    assert t0 == sorted(t0) and t0[-1] == 20


def test_shutdown_is_bounded_while_the_store_hangs_and_the_hung_batch_is_redelivered(models):
    items = interleaved(30)
    items.insert(12, SinkHangs(seconds=1.5))
    script = Script(items)
    worker = StreamWorker(settings_for(models, shutdown_timeout_s=0.3), source=script.source(), sink=script.sink,
                          dead_letters=script.dead_letters())
    threading.Timer(0.3, worker.request_stop).start()
    started = time.monotonic()
    assert worker.run() == 0
    took = time.monotonic() - started
    assert took < 1.4, f"shutdown took {took:.1f}s with a 0.3s bound and a 1.5s hang"
    assert worker.pipeline.abandoned
    tp, offset = where(script, items[13])
    assert script.committed.get(tp, 0) <= offset
    time.sleep(1.5)  # the abandoned write finishes (in a real worker the process exit ends it)
    assert worker_on(script, settings_for(models)).run() == 0
    assert_everything_once(script, 30)


def test_rows_the_store_refuses_are_dead_lettered_with_the_reason_and_the_partition_moves_on(models):
    items = interleaved(30)
    items.insert(7, SinkRefuses("column 'x0': out of range"))
    script = Script(items)
    assert worker_on(script, settings_for(models)).run() == 0
    refused = items[8]
    assert [(r.topic, r.partition, reason) for r, reason, _ in script.letters] == [
        (refused.topic, refused.partition, "column 'x0': out of range")]
    assert_everything_once(script, 30)


def test_undecodable_records_are_dead_lettered_and_the_rest_stored(models):
    items = interleaved(20)
    items[4] = rec("t", 0, b"\xff not json")
    items[9] = rec("t", 1, {"id": "bad", "x0": "abc"})
    script = Script(items)
    assert worker_on(script, settings_for(models)).run() == 0
    assert len(script.letters) == 2
    assert_everything_once(script, 20)


def test_on_bad_record_fail_stops_with_exit_1_and_commits_nothing_of_the_bad_batch(models):
    items = interleaved(40)
    items[25] = rec("t", 1, {"id": "bad", "x0": "abc"})
    script = Script(items)
    worker = worker_on(script, settings_for(models, on_bad_record="fail"))
    assert worker.run() == 1
    assert script.committed.get(("t", 1), 0) <= 12  # record 25 is t[1] offset 12
    assert not script.letters


# -- the Kafka source's own rule, on its real poll_batch ------------------------------------------------------
class ScriptedConsumer:
    """Stands in for confluent-kafka's Consumer under ``KafkaSource.poll_batch`` (a broker cannot be told to
    rebalance inside one particular consume call; the broker tests cover real rebalances). ``consume`` returns
    the next scripted chunk and, where the script says, calls the revoke callback first, as librdkafka does
    inside consume."""

    def __init__(self, chunks, on_revoke):
        self.chunks = list(chunks)
        self.on_revoke = on_revoke
        self.unassigned: list[tuple[str, int]] = []  # incremental_unassign calls (the cooperative protocol)

    def incremental_unassign(self, partitions):
        self.unassigned += [(p.topic, p.partition) for p in partitions]

    def consume(self, num_messages, timeout):
        if not self.chunks:
            time.sleep(min(timeout, 0.01))
            return []
        chunk = self.chunks.pop(0)
        if chunk == "revoke t[0]":
            from confluent_kafka import TopicPartition

            self.on_revoke(self, [TopicPartition("t", 0)])
            return []
        return chunk


def test_kafka_source_drops_records_of_a_partition_revoked_during_the_poll(models):
    from confluent_kafka import Message

    from workers.observability import Metrics
    from workers.sources.kafka import KafkaSource

    def msg(p, o):
        return Message(topic="t", partition=p, offset=o, key=None, value=b"{}", timestamp=(1, 0))

    source = KafkaSource(settings_for(models), Metrics())  # builds without a broker (no I/O before open)
    source._assigned = {("t", 0), ("t", 1)}
    source.consumer = ScriptedConsumer([[msg(0, 0), msg(1, 0)], "revoke t[0]", [msg(0, 0), msg(1, 1)]],
                                       source._on_revoke)
    batch = source.poll_batch(10, 200)
    assert [(m.partition(), m.offset()) for m in batch.messages] == [(1, 0), (0, 0), (1, 1)]
    assert source.assignment() == {("t", 1)}
    assert source.consumer.unassigned == [("t", 0)]  # cooperative (the default): only the revoked one
