"""How long a scale step stops the partitions that do not move, eager vs cooperative-sticky.

`.venv/bin/python benchmarks/rebalance.py [--strategies cooperative-sticky,range] [--static]`

Per strategy: 3 worker processes on a 12-partition topic under steady load (about 1200 records/s, round robin),
then a 4th joins (scale up) and, once every partition is consumed again, is stopped with SIGTERM (scale down).
Each worker's ``scoring_consumer_lag_seconds`` (the age of the oldest uncommitted record, per partition) is
scraped every 100 ms; a partition that stops consuming shows it as the age of the records that waited. For each
step, a partition "did not move" when the same worker owns it before and after; the figure is the worst age seen
on those partitions during the step, minus their worst age in a steady window before it (the pipeline's own
latency). Moved partitions are reported too. The sink is a Parquet directory (no store contention between the
workers). ``--static`` gives each worker a stable ``HOSTNAME`` (static membership): a static member stopped with
SIGTERM does not leave the group, so its partitions wait for the session timeout (6 s here).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid

import orjson

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.run import Broker  # noqa: E402
from tests import helpers  # noqa: E402
from tests.conftest import free_port  # noqa: E402
from tests.kafka_util import FAST_GROUP  # noqa: E402

PARTITIONS = 12
RATE = 1200  # records/s over all partitions


def lag_seconds(port: int) -> dict[int, float]:
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3).read().decode()
    except OSError:
        return {}
    return {int(line.split('partition="')[1].split('"')[0]): float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line.startswith("scoring_consumer_lag_seconds{")}


class Load(threading.Thread):
    """Produces RATE records/s, one partition after the other, with CreateTime now."""

    def __init__(self, broker: Broker, topic: str):
        super().__init__(daemon=True)
        self.producer, self.topic, self.stop = broker.kafka.producer, topic, threading.Event()

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            started = time.monotonic()
            for _ in range(RATE // 20):
                body = orjson.dumps({"id": f"r{i}", **{f"x{j}": float((i * 7 + j) % 13) for j in range(8)}})
                self.producer.produce(self.topic, value=body, partition=i % PARTITIONS)
                i += 1
            self.producer.poll(0)
            time.sleep(max(0.05 - (time.monotonic() - started), 0))


class Watch(threading.Thread):
    """Scrapes every worker's lag seconds every 100 ms: owner and worst age per partition, per window."""

    def __init__(self, ports: dict[str, int]):
        super().__init__(daemon=True)
        self.ports, self.stop = ports, threading.Event()
        self.owner: dict[int, str] = {}
        self.worst: dict[int, float] = {}
        self.lock = threading.Lock()

    def window(self) -> dict[int, float]:
        """The worst age per partition since the last call (and start a new window)."""
        with self.lock:
            worst, self.worst = self.worst, {}
        return worst

    def run(self) -> None:
        while not self.stop.is_set():
            for name, port in list(self.ports.items()):
                for p, age in lag_seconds(port).items():
                    with self.lock:
                        self.owner[p] = name
                        self.worst[p] = max(self.worst.get(p, 0.0), age)
            time.sleep(0.1)

    def owners(self) -> dict[int, str]:
        with self.lock:
            return dict(self.owner)


def settled(watch: Watch, names: set[str], timeout: float = 60.0) -> None:
    """Wait until the workers ``names`` own all partitions between them and every age is below 2 s for 3 s."""
    deadline = time.monotonic() + timeout
    calm_since = None
    while time.monotonic() < deadline:
        current = {p: lag_seconds(port) for p, port in [(n, watch.ports[n]) for n in names]}
        owned = {p: (n, age) for n, ages in current.items() for p, age in ages.items()}
        if len(owned) == PARTITIONS and all(age < 2.0 for _, age in owned.values()) and \
                set(n for n, _ in owned.values()) == names:
            calm_since = calm_since or time.monotonic()
            if time.monotonic() - calm_since >= 3:
                return
        else:
            calm_since = None
        time.sleep(0.2)
    raise SystemExit(f"not settled after {timeout}s: {current}")


def step(watch: Watch, before: dict[int, str], baseline: dict[int, float], action, names: set[str]) -> dict:
    watch.window()
    started = time.monotonic()
    action()
    settled(watch, names)
    worst = watch.window()
    after = {p: n for p, n in watch.owners().items()}
    unmoved = [p for p in range(PARTITIONS) if before.get(p) == after.get(p)]
    moved = [p for p in range(PARTITIONS) if p not in unmoved]
    pause = {p: round(max(worst.get(p, 0.0) - baseline.get(p, 0.0), 0.0), 2) for p in range(PARTITIONS)}
    return {"unmoved": len(unmoved), "unmoved_max_s": max((pause[p] for p in unmoved), default=0.0),
            "unmoved_median_s": sorted(pause[p] for p in unmoved)[len(unmoved) // 2] if unmoved else 0.0,
            "moved": len(moved), "moved_max_s": max((pause[p] for p in moved), default=0.0),
            "settled_s": round(time.monotonic() - started, 1)}


def case(broker: Broker, model: str, strategy: str, static: bool, folder: str) -> dict:
    topic = broker.kafka.topic(partitions=PARTITIONS, prefix="rb")
    group = f"g-{uuid.uuid4().hex[:8]}"
    procs: dict[str, subprocess.Popen] = {}
    ports: dict[str, int] = {}

    def start(name: str) -> None:
        ports[name] = free_port()
        env = {k: v for k, v in os.environ.items() if k != "HOSTNAME"}
        if static:
            env["HOSTNAME"] = f"{group}-{name}"
        procs[name] = subprocess.Popen(
            [sys.executable, "-m", "workers", "stream", "--bootstrap-servers", broker.bootstrap, *FAST_GROUP,
             "--model", model, "--topic", topic, "--group", group, "--sink", os.path.join(folder, group),
             "--assignment-strategy", strategy, "--metrics-port", str(ports[name]), "--max-wait-ms", "50"],
            stdout=subprocess.DEVNULL, stderr=open(os.path.join(folder, f"{group}-{name}.log"), "w"), env=env)

    load = Load(broker, topic)
    load.start()
    watch = Watch(ports)
    try:
        for name in ("w0", "w1", "w2"):
            start(name)
        watch.start()
        settled(watch, {"w0", "w1", "w2"}, timeout=90)
        watch.window()
        time.sleep(5)
        baseline, before = watch.window(), watch.owners()
        up = step(watch, before, baseline, lambda: start("w3"), {"w0", "w1", "w2", "w3"})
        time.sleep(3)
        watch.window()
        time.sleep(5)
        baseline, before = watch.window(), watch.owners()

        def stop_w3() -> None:
            procs["w3"].send_signal(signal.SIGTERM)
            procs["w3"].wait(30)
            del ports["w3"]

        down = step(watch, before, baseline, stop_w3, {"w0", "w1", "w2"})
        return {"strategy": strategy, "static": static, "up": up, "down": down}
    finally:
        load.stop.set()
        watch.stop.set()
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--strategies", default="cooperative-sticky,range")
    parser.add_argument("--static", action="store_true", help="stable HOSTNAME per worker (static membership)")
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="rebalance-")
    model = helpers.save(helpers.train("binary"), folder, "binary")
    with Broker() as broker:
        for strategy in args.strategies.split(","):
            result = case(broker, model, strategy, args.static, folder)
            for kind in ("up", "down"):
                r = result[kind]
                print(f"{strategy:<19} static={args.static!s:<5} scale {kind:<4}: {r['unmoved']:2} partitions did "
                      f"not move, stopped max {r['unmoved_max_s']:5.2f} s (median {r['unmoved_median_s']:.2f}); "
                      f"{r['moved']:2} moved, max {r['moved_max_s']:5.2f} s; settled in {r['settled_s']} s",
                      flush=True)
    print(f"logs: {folder}")


if __name__ == "__main__":
    main()
