"""What every fault scenario shares: a record generator with poison mixed in, workers as processes, and a
checker that compares every input record with the store and the dead-letter topic."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

import lightgbm as lgb
import numpy as np
import orjson
import psycopg

FEATURES = [f"x{j}" for j in range(8)]

# Poison of every kind the decoder meets, cycled through the bad records.
POISON: list[bytes | None] = [
    b"\xff\xfe\xfa not utf-8",
    b"{truncated json",
    b"[1, 2, 3]",
    b'"a string"',
    b"12345",
    b"null",
    orjson.dumps({"x0": 1.0}),  # no id
    orjson.dumps({"id": None, "x0": 1.0}),
    orjson.dumps({"id": ["list"], "x0": 1.0}),
    orjson.dumps({"id": "wrong-type", "x0": "abc"}),
    orjson.dumps({"id": "bool", "x1": True}),
    orjson.dumps({"id": "nested", "x2": {"a": 1}}),
    b'{"id": "nan", "x0": NaN}',
    b'{"id": "inf", "x0": Infinity}',
    orjson.dumps({"id": "huge-number", "x0": "1e999999"}),
    b'{"id": "overflow", "x0": 1e999}',  # beyond double range (a 30-digit integer is a valid number)
    orjson.dumps({"id": "x" * 5000, "x0": 1.0}),
    None,  # tombstone
]


@dataclass
class Produced:
    valid: dict[str, list[float]] = field(default_factory=dict)  # id -> features
    bad: dict[bytes, bytes | None] = field(default_factory=dict)  # key -> value

    @property
    def total(self) -> int:
        return len(self.valid) + len(self.bad)


def make_record(i: int, bad_every: int, rng: np.random.Generator) -> tuple[bytes, bytes | None, list | None]:
    if bad_every and i % bad_every == bad_every - 1:
        return f"bad-{i}".encode(), POISON[(i // bad_every) % len(POISON)], None
    values = list(map(float, rng.normal(size=8)))
    return f"k{i}".encode(), orjson.dumps({"id": f"k{i}", **dict(zip(FEATURES, values, strict=True))}), values


def produce(kafka, topic: str, n: int, start: int = 0, bad_every: int = 100, produced: Produced | None = None,
            seed: int = 0) -> Produced:
    produced = produced or Produced()
    rng = np.random.default_rng(seed + start)
    batch = []
    for i in range(start, start + n):
        key, value, feats = make_record(i, bad_every, rng)
        batch.append((key, value))
        if feats is None:
            produced.bad[key] = value
        else:
            produced.valid[key.decode()] = feats
    kafka.produce(topic, batch)
    return produced


class Producer(threading.Thread):
    """Produces continuously at about ``rate`` records/s until stopped."""

    def __init__(self, kafka, topic: str, rate: int, bad_every: int = 100):
        super().__init__(daemon=True)
        self.kafka, self.topic, self.rate, self.bad_every = kafka, topic, rate, bad_every
        self.produced = Produced()
        self.stop_event = threading.Event()
        self.next = 0

    def run(self) -> None:
        chunk = max(self.rate // 10, 1)
        while not self.stop_event.is_set():
            started = time.monotonic()
            produce(self.kafka, self.topic, chunk, start=self.next, bad_every=self.bad_every, produced=self.produced)
            self.next += chunk
            time.sleep(max(0.1 - (time.monotonic() - started), 0))

    def stop(self) -> Produced:
        self.stop_event.set()
        self.join(30)
        return self.produced


def rebalances(log_path: str) -> int:
    """Revocations of a non-empty assignment seen by one worker (from its JSON log)."""
    n = 0
    with open(log_path) as f:
        for line in f:
            if '"partitions revoked"' in line:
                try:
                    if orjson.loads(line).get("partitions"):
                        n += 1
                except orjson.JSONDecodeError:
                    pass
    return n


@dataclass
class Report:
    scenario: str
    records_in: int
    valid: int
    bad: int
    stored: int
    dead_lettered: int
    duplicates: int
    lost: int
    unexpected: int
    wrong_scores: int
    dlq_missing: int
    dlq_duplicates: int
    extra: dict = field(default_factory=dict)

    def line(self) -> str:
        extra = " ".join(f"{k}={v}" for k, v in self.extra.items())
        return (f"[{self.scenario}] in={self.records_in} valid={self.valid} bad={self.bad} stored={self.stored} "
                f"dead_lettered={self.dead_lettered} duplicates={self.duplicates} lost={self.lost} "
                f"unexpected={self.unexpected} wrong_scores={self.wrong_scores} dlq_missing={self.dlq_missing} "
                f"dlq_duplicates={self.dlq_duplicates} {extra}").strip()

    def assert_exact(self) -> None:
        assert (self.duplicates, self.lost, self.unexpected, self.wrong_scores, self.dlq_missing) == (0, 0, 0, 0, 0), \
            self.line()


def stored_count(dsn: str, table: str) -> int:
    with psycopg.connect(dsn) as conn:
        try:
            return conn.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0]
        except psycopg.errors.UndefinedTable:
            return 0


def check(scenario: str, produced: Produced, dsn: str, table: str, kafka, topic: str, model_path: str,
          **extra) -> Report:
    """Every valid record exactly once in the store with the right score; every bad one dead-lettered."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(f'SELECT id, score FROM "{table}"').fetchall()
        per_id = dict(conn.execute(f'SELECT id, count(*) FROM "{table}" GROUP BY id').fetchall())
    duplicates = sum(c - 1 for c in per_id.values() if c > 1)
    stored = {rid: score for rid, score in rows}
    lost = [rid for rid in produced.valid if rid not in stored]
    unexpected = [rid for rid in stored if rid not in produced.valid]
    booster = lgb.Booster(model_file=model_path)
    ids = [rid for rid in produced.valid if rid in stored]
    wrong = 0
    if ids:
        expected = booster.predict(np.array([produced.valid[i] for i in ids]))
        wrong = int(np.sum(np.abs(np.array([stored[i] for i in ids]) - expected) > 1e-9))
    dead = kafka.consume_all(f"{topic}.dlq", len(produced.bad), timeout=60) if produced.bad else []
    keys = [m.key() for m in dead]
    by_key: dict = {}
    for m in dead:
        by_key.setdefault(m.key(), m)
    dlq_missing = [k for k in produced.bad if k not in by_key]
    for key, msg in by_key.items():
        headers = dict(msg.headers() or [])
        assert headers.get("error.reason"), key
        original = produced.bad.get(key)
        if original is not None and len(original) <= 512 * 1024:
            assert msg.value() == original, key
    report = Report(scenario, produced.total, len(produced.valid), len(produced.bad), len(stored), len(set(keys)),
                    duplicates, len(lost), len(unexpected), wrong, len(dlq_missing), len(keys) - len(set(keys)),
                    extra)
    print("\n" + report.line())
    with open(os.environ.get("FAULTS_REPORT", "/tmp/faults-report.txt"), "a") as f:
        f.write(report.line() + "\n")
    return report
