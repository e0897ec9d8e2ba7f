"""Stream mode's per-record cost outside the model, stage by stage (CPU us/record, min over repeats).

`OMP_NUM_THREADS=1 .venv/bin/python benchmarks/stream_stages.py [--repeats 7] [--rows 2000] [--lleaves]`

Why: with a compiled model predict costs ~5 us/record, so the Python around it (decode, building results,
sink payloads) decides stream throughput. This times each stage on the code's own paths, in process:

- decode: ``Router.decode`` as ``ScoreStage.decode`` calls it (JSON values, or Avro / Protobuf Confluent-wire
  values read by ``workers.decode.wire`` with schemas from the test registry, tests/schema_registry.py);
- score: ``carry_columns`` + ``Router.finish`` with a 1-tree model, its predict timed alone and subtracted
  (the non-model part); predict of the 500-tree/63-leaf model is reported on its own line;
- sink: Kafka JSON messages (``workers.sinks.kafka.result_messages``) and the PostgreSQL COPY payload
  (``PgTables.render``; the table is created once in PostgreSQL at TEST_POSTGRES_DSN, the render itself makes
  no round trip). Skipped with a note when PostgreSQL is not reachable.

"non-model" totals are decode + score(non-model) + sink, per input format and sink.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

import lightgbm as lgb
import numpy as np
import orjson

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cputime import cpu_us  # noqa: E402

from workers.decode.records import carry_columns  # noqa: E402
from workers.scoring.model import load_model  # noqa: E402
from workers.scoring.router import Router  # noqa: E402
from workers.settings import ModelSettings, ScoringSettings  # noqa: E402

N_FEATURES = 30
NAMES = [f"f{i}" for i in range(N_FEATURES)]
BENCH = os.path.join(ROOT, ".bench", "stages")
PG = os.environ.get("TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")


def build_model(trees: int, leaves: int) -> str:
    os.makedirs(BENCH, exist_ok=True)
    path = os.path.join(BENCH, f"binary{trees}x{leaves}.txt")
    if not os.path.exists(path):
        rng = np.random.default_rng(0)
        x = rng.normal(size=(20_000, N_FEATURES))
        y = (x[:, 0] + x[:, 1] * x[:, 2] - x[:, 3] + rng.normal(size=20_000) > 0).astype(int)
        params = {"objective": "binary", "num_leaves": leaves, "verbose": -1, "seed": 1, "num_threads": 1}
        lgb.train(params, lgb.Dataset(x, y, feature_name=NAMES), trees).save_model(path)
    return path


def router_for(path: str, backend: str) -> Router:
    model = load_model(ModelSettings(path=path, backend=backend, cache_dir=os.path.join(BENCH, "cache")))
    return Router.single(model, ScoringSettings())


def records(n: int, seed: int) -> list[dict]:
    m = np.random.default_rng(seed).normal(size=(n, N_FEATURES))
    return [{"id": f"r{seed}-{i}", **{f: float(m[i, j]) for j, f in enumerate(NAMES)}} for i in range(n)]


def wire_values(fmt: str, recs: list[dict]) -> tuple[list[bytes], Any]:
    """Confluent-wire values made by confluent-kafka's serializers, and our reader with their schemas fetched."""
    from confluent_kafka.schema_registry import SchemaRegistryClient
    from confluent_kafka.serialization import MessageField, SerializationContext

    from tests.schema_registry import TestRegistry
    from workers.decode.registry import RegistryClient
    from workers.decode.wire import wire_format
    from workers.settings import SchemaRegistrySettings

    reg = TestRegistry()
    client = SchemaRegistryClient({"url": reg.url})
    ctx = SerializationContext("stages", MessageField.VALUE)
    if fmt == "avro":
        from confluent_kafka.schema_registry.avro import AvroSerializer

        fields = [{"name": "id", "type": "string"}] + [{"name": f, "type": ["null", "double"], "default": None}
                                                         for f in NAMES]
        ser = AvroSerializer(client, orjson.dumps({"type": "record", "name": "In", "fields": fields}).decode())
        values = [ser(r, ctx) for r in recs]
    else:
        from confluent_kafka.schema_registry.protobuf import ProtobufSerializer
        from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

        fd = descriptor_pb2.FieldDescriptorProto
        fdp = descriptor_pb2.FileDescriptorProto(name="stages.proto", package="s", syntax="proto3")
        msg = fdp.message_type.add(name="In")
        msg.field.add(name="id", number=1, type=fd.TYPE_STRING, label=fd.LABEL_OPTIONAL)
        for j, f in enumerate(NAMES):
            msg.field.add(name=f, number=2 + j, type=fd.TYPE_DOUBLE, label=fd.LABEL_OPTIONAL)
        pool = descriptor_pool.DescriptorPool()
        pool.Add(fdp)
        cls = message_factory.GetMessageClass(pool.FindMessageTypeByName("s.In"))
        ser = ProtobufSerializer(cls, client, {"use.deprecated.format": False})
        values = [ser(cls(**r), ctx) for r in recs]
    wire = wire_format(fmt, RegistryClient(SchemaRegistrySettings(url=reg.url)), ["id", *NAMES])
    wire.prepare(values)
    wire.registry_server = reg  # keep it alive
    return values, wire


def pg_render() -> Callable[[Any], bytes] | None:
    """scored -> the COPY payload the PostgreSQL sink sends (its table made once), or None without PostgreSQL."""
    try:
        import psycopg

        from workers.sinks.postgres import PostgresSink
        from workers.sinks.tables import RESULT_KEY

        sink = PostgresSink(f"{PG}?table=stage_bench", "SCORING_STREAM__SINK")
        conn = sink._connection()
    except Exception as exc:  # noqa: BLE001 - the benchmark runs without PostgreSQL, saying so
        print(f"(PostgreSQL sink skipped: {type(exc).__name__}: {exc})")
        return None
    types: dict = {}

    def render(scored: Any) -> bytes:
        results, _keep, _errors = sink._prepare(scored, None)
        if not types:
            with conn.cursor() as cur:
                types.update(sink.tables.ensure(cur, "", results.schema, RESULT_KEY))
            conn.commit()
        csv, bad = sink.tables.render(results, types, RESULT_KEY)
        assert not bad
        return csv

    del psycopg
    return render


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--lleaves", action="store_true", help="predict the 500-tree model with lleaves (compiles once)")
    ap.add_argument("--formats", default="json,avro,protobuf")
    args = ap.parse_args()
    n, reps = args.rows, args.repeats
    from workers.sinks.kafka import result_messages
    from workers.sinks.rowjson import plain_columns

    trivial = router_for(build_model(1, 2), "lightgbm")
    big = router_for(build_model(500, 63), "lleaves" if args.lleaves else "lightgbm")
    recs = records(n, 1)
    keys = [r["id"].encode() for r in recs]
    topics, parts, offs = ["t"] * n, [0] * n, list(range(n))
    stamps = np.full(n, 1_700_000_000_000, dtype=np.int64)
    render = pg_render()
    rows: list[tuple[str, float]] = []
    totals: dict[str, float] = {}
    for fmt in args.formats.split(","):
        native = None
        if fmt == "json":
            values, parse = [orjson.dumps(r) for r in recs], None
        else:
            values, wire = wire_values(fmt, recs)
            wire.want(trivial.input_columns())
            parse, native = wire.parse, wire.rows  # as ScoreStage.decode calls it
        routed, decoded = trivial.decode(values, keys, False, parse, native)
        assert not decoded.features.reasons, list(decoded.features.reasons.items())[:3]
        t_decode = cpu_us(lambda v=values, p=parse, r=native: trivial.decode(v, keys, False, p, r), n, reps)
        if parse is not None:
            rows.append((f"{fmt}: wire parse alone (the Python path)", cpu_us(lambda v=values, p=parse: p(v), n, reps)))
        rows.append((f"{fmt}: decode", t_decode))
        totals[fmt] = t_decode
    # score: the same for every input format (the decoded matrix is the same)
    values = [orjson.dumps(r) for r in recs]
    routed, decoded = trivial.decode(values, keys, False, None)

    def finish(router: Router = trivial) -> Any:
        carry = carry_columns(decoded.passthrough, topics, parts, offs, stamps)
        return router.finish(routed, carry)

    matrix = decoded.features.matrix
    t_finish = cpu_us(finish, n, reps)
    t_pred1 = cpu_us(lambda: trivial.primary.model.predict(matrix), n, reps)
    t_pred500 = cpu_us(lambda: big.primary.model.predict(matrix), n, reps)
    score_nm = t_finish - t_pred1
    rows.append(("score (non-model: finish 1-tree minus its predict)", score_nm))
    rows.append((f"predict 500 trees/63 leaves ({big.primary.model.backend}, not in totals)", t_pred500))
    scored = finish()
    t_kafka = cpu_us(lambda: result_messages(plain_columns(scored)), n, reps)
    rows.append(("sink: Kafka JSON messages", t_kafka))
    t_pg = None
    if render is not None:
        t_pg = cpu_us(lambda: render(scored), n, reps)
        rows.append(("sink: PostgreSQL COPY payload (no round trip)", t_pg))
    for fmt, t in totals.items():
        rows.append((f"non-model total {fmt} -> Kafka JSON", t + score_nm + t_kafka))
        if t_pg is not None:
            rows.append((f"non-model total {fmt} -> PostgreSQL", t + score_nm + t_pg))
    print(f"{'stage':<66} {'us/record':>10}")
    for name, us in rows:
        print(f"{name:<66} {us:>10.2f}")


if __name__ == "__main__":
    main()
