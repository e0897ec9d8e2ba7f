"""SIGTERM while a slow store write is in flight: the worker finishes it, commits, exits 0 within its bound."""

from __future__ import annotations

import signal
import time

import psycopg
import pytest

from tests.faults.common import check, produce, stored_count
from tests.kafka_util import wait_for

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]


def started(log: str) -> bool:
    try:
        return '"stream start"' in open(log).read()
    except FileNotFoundError:
        return False


def sleeping_writes(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep' "
                            "AND query ILIKE 'INSERT INTO%'").fetchone()[0]


def test_sigterm_mid_write_exits_in_bound_and_check_holds(models, kafka, pg_dsn, pg_table, tmp_path):
    topic = kafka.topic(partitions=3)
    group = f"g-{pg_table}"
    args = ("--model", models["binary"], "--topic", topic, "--group", group, "--sink", f"{pg_dsn}?table={pg_table}",
            "--max-records", "500", "--metrics-port", "0", "--shutdown-timeout-s", "15")
    produced = produce(kafka, topic, 1000)
    first = kafka.worker(*args, log=str(tmp_path / "a.log"))
    wait_for(lambda: stored_count(pg_dsn, pg_table) >= len(produced.valid), 60, what="first records stored")
    first.send_signal(signal.SIGTERM)
    assert first.wait(30) == 0
    # From now on every insert statement into the table takes 3 s: a store that is slow, not down.
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("CREATE OR REPLACE FUNCTION slow_insert() RETURNS trigger LANGUAGE plpgsql AS "
                     "$$ BEGIN PERFORM pg_sleep(3); RETURN NULL; END $$")
        conn.execute(f'CREATE TRIGGER slow BEFORE INSERT ON "{pg_table}" FOR EACH STATEMENT '
                     "EXECUTE FUNCTION slow_insert()")
    produce(kafka, topic, 3000, start=1000, produced=produced)
    second = kafka.worker(*args, log=str(tmp_path / "b.log"))
    wait_for(lambda: sleeping_writes(pg_dsn) > 0, 60, interval=0.1, what="a slow write in flight")
    sent = time.monotonic()
    second.send_signal(signal.SIGTERM)
    code = second.wait(30)
    exit_time = time.monotonic() - sent
    assert code == 0 and exit_time < 15, (code, exit_time)
    committed = sum(kafka.committed(group, topic, 3).values())
    stored = stored_count(pg_dsn, pg_table)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f'DROP TRIGGER slow ON "{pg_table}"')
    # The batch in flight was finished and committed: beyond the first 1000, something was committed...
    assert committed > 1000
    # ...and everything committed is stored (stored counts valid records only; committed counts bad ones too).
    assert stored >= committed - len(produced.bad), (stored, committed)
    third_log = str(tmp_path / "c.log")
    third = kafka.worker(*args, log=third_log)
    wait_for(lambda: started(third_log), 30, what="third worker up")
    wait_for(lambda: stored_count(pg_dsn, pg_table) >= len(produced.valid), 90, what="drain")
    third.send_signal(signal.SIGTERM)
    assert third.wait(30) == 0
    check("sigterm-slow-sink", produced, pg_dsn, pg_table, kafka, topic, models["binary"],
          exit_time_s=round(exit_time, 1), committed_at_exit=committed).assert_exact()
