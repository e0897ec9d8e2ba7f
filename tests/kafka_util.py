"""Kafka test helpers built on confluent-kafka's plain Producer/Consumer/AdminClient: not our source or sink
code, so a bug in how the worker drives the client (rebalances, commits, pauses) cannot hide. The worker uses
the same librdkafka underneath; tests that need a second opinion on the broker's state ask kafka-python
(see ``committed_kafka_python``)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

import orjson
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

# Tansu joins a group after about half the session timeout: keep it short in tests.
FAST_GROUP = ["--session-timeout-ms", "6000", "--heartbeat-interval-ms", "2000"]


def committed_kafka_python(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, int]:
    """The group's committed offsets as kafka-python (a client sharing no code with librdkafka) reads them."""
    from kafka.admin import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        got = admin.list_group_offsets(group).get(group, {})
    finally:
        admin.close()
    by_partition = {tp.partition: meta.offset for tp, meta in got.items() if tp.topic == topic}
    return {p: max(by_partition.get(p, 0), 0) for p in range(partitions)}


class KafkaHelper:
    def __init__(self, bootstrap: str, config: dict | None = None):
        """``config``: librdkafka properties every client of the helper adds (TLS: tests/tls_util.py)."""
        self.bootstrap = bootstrap
        self.config = {"bootstrap.servers": bootstrap, **(config or {})}
        self.admin = AdminClient(self.config)
        self.producer = Producer({**self.config, "enable.idempotence": True, "linger.ms": 5})
        self.procs: list[subprocess.Popen] = []

    def topic(self, partitions: int = 3, prefix: str = "t") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        futures = self.admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])
        for f in futures.values():
            f.result(15)
        return name

    def produce(self, topic: str, records: list[tuple[bytes | None, bytes | None]], partition: int | None = None,
                one_per_request: bool = False) -> None:
        for key, value in records:
            kwargs = {} if partition is None else {"partition": partition}
            while True:
                try:
                    self.producer.produce(topic, key=key, value=value, **kwargs)
                    break
                except BufferError:  # the local queue is full: let deliveries drain it
                    self.producer.poll(0.05)
            if one_per_request:
                self.producer.flush(10)
            else:
                self.producer.poll(0)
        assert self.producer.flush(30) == 0

    def produce_json(self, topic: str, objs: list[dict], **kw) -> None:
        self.produce(topic, [(str(o.get("id", "")).encode(), orjson.dumps(o)) for o in objs], **kw)

    def consume_all(self, topic: str, expect: int, timeout: float = 30.0) -> list:
        """Every message of ``topic`` (all partitions, from the start), waiting until ``expect`` arrived."""
        consumer = Consumer({**self.config, "group.id": f"reader-{uuid.uuid4().hex[:8]}",
                             "enable.auto.commit": False})
        meta = consumer.list_topics(topic, timeout=10).topics[topic]
        consumer.assign([TopicPartition(topic, p, 0) for p in meta.partitions])
        out = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(out) < expect:
            msg = consumer.poll(0.5)
            if msg is not None and not msg.error():
                out.append(msg)
        # Linger briefly so an unexpected extra message is seen, not missed.
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            msg = consumer.poll(0.2)
            if msg is not None and not msg.error():
                out.append(msg)
        consumer.close()
        return out

    def committed(self, group: str, topic: str, partitions: int) -> dict[int, int]:
        """The group's committed offsets, read by librdkafka and cross-checked by kafka-python.

        The two reads are not atomic: a commit that lands between them makes them differ for a moment
        (seen in CI: 0 vs 500 while the worker's first commit was landing). So a disagreement is read again
        until both clients see the same offsets; one that lasts over ~3 s is a real disagreement and fails.
        """
        deadline = time.monotonic() + 3.0
        while True:
            mine = self._committed_librdkafka(group, topic, partitions)
            other = committed_kafka_python(self.bootstrap, group, topic, partitions)
            if mine == other:
                return mine
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"librdkafka and kafka-python disagree on the committed offsets: {mine} vs {other}")
            time.sleep(0.2)

    def _committed_librdkafka(self, group: str, topic: str, partitions: int) -> dict[int, int]:
        consumer = Consumer({**self.config, "group.id": group, "enable.auto.commit": False})
        got = consumer.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
        consumer.close()
        # librdkafka reports "nothing committed" as a negative sentinel (-1001): that is offset 0 here.
        return {tp.partition: max(tp.offset, 0) for tp in got}

    def worker(self, *args: str, env: dict | None = None, log: str | None = None) -> subprocess.Popen:
        """Start ``scoring-worker stream`` as a real process against this broker."""
        # Metrics on a free port unless the test picks one: two workers of parallel tests on the default 9000
        # made the later one exit 2 ("cannot listen on 0.0.0.0:9000"), seen once in CI.
        env = env or {}
        port = [] if "--metrics-port" in args or "SCORING_STREAM__METRICS_PORT" in env else ["--metrics-port", "0"]
        cmd = [sys.executable, "-m", "workers", "stream", "--bootstrap-servers", self.bootstrap, *FAST_GROUP, *port,
               *args]
        out = open(log, "w") if log else subprocess.DEVNULL
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT if log else subprocess.DEVNULL,
                                env={**os.environ, **env})
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self.producer.flush(5)


def wait_for(predicate, timeout: float = 60.0, interval: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
