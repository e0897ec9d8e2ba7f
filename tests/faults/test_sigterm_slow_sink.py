"""SIGTERM while a slow store write is in flight: the worker finishes it, commits, exits 0 within its bound."""

from __future__ import annotations

import signal
import time

import psycopg
import pytest

from tests.faults.common import check, produce, stored_count
from tests.kafka_util import wait_for

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]


def test_sigterm_mid_write_exits_in_bound_and_check_holds(models, kafka, pg_dsn, pg_table, tmp_path):
    topic = kafka.topic(partitions=3)
    group = f"g-{pg_table}"
    produced = produce(kafka, topic, 3000)
    args = ("--model", models["binary"], "--topic", topic, "--group", group, "--sink", f"{pg_dsn}?table={pg_table}",
            "--max-records", "500", "--metrics-port", "0", "--shutdown-timeout-s", "15")
    first = kafka.worker(*args, log=str(tmp_path / "a.log"))
    wait_for(lambda: stored_count(pg_dsn, pg_table) > 0, 60, what="table created")
    first.send_signal(signal.SIGTERM)
    assert first.wait(30) == 0
    # Every insert into the table now takes 3 s: a store that is slow, not down.
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("CREATE OR REPLACE FUNCTION slow_insert() RETURNS trigger LANGUAGE plpgsql AS "
                     "$$ BEGIN PERFORM pg_sleep(3); RETURN NULL; END $$")
        conn.execute(f'CREATE TRIGGER slow BEFORE INSERT ON "{pg_table}" FOR EACH STATEMENT '
                     "EXECUTE FUNCTION slow_insert()")
    second = kafka.worker(*args, log=str(tmp_path / "b.log"))
    time.sleep(8)  # joined, and in the middle of a 3 s write
    sent = time.monotonic()
    second.send_signal(signal.SIGTERM)
    code = second.wait(30)
    exit_time = time.monotonic() - sent
    assert code == 0 and exit_time < 15, (code, exit_time)
    committed = sum(kafka.committed(group, topic, 3).values())
    stored = stored_count(pg_dsn, pg_table)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f'DROP TRIGGER slow ON "{pg_table}"')
    # Everything committed is stored (stored counts only valid records; committed counts bad ones too).
    assert stored >= committed - len(produced.bad), (stored, committed)
    third = kafka.worker(*args, log=str(tmp_path / "c.log"))
    wait_for(lambda: stored_count(pg_dsn, pg_table) >= len(produced.valid), 90, what="drain")
    third.send_signal(signal.SIGTERM)
    assert third.wait(30) == 0
    check("sigterm-slow-sink", produced, pg_dsn, pg_table, kafka, topic, models["binary"],
          exit_time_s=round(exit_time, 1)).assert_exact()
