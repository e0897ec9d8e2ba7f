"""The peer: a Quix Streams application that scores one record per message with the same model.

Runs in its own virtualenv (quixstreams pins other versions of confluent-kafka and pydantic). Usage:
    python quix_peer.py BOOTSTRAP IN_TOPIC OUT_TOPIC MODEL N
Prints one JSON line: records, seconds (first to last record scored), records_per_s.
"""

import json
import sys
import time
import uuid

import lightgbm as lgb
import numpy as np
from quixstreams import Application


def main() -> None:
    bootstrap, in_topic, out_topic, model_path, n = sys.argv[1:6]
    n = int(n)
    booster = lgb.Booster(model_file=model_path)
    names = booster.feature_name()
    app = Application(broker_address=bootstrap, consumer_group=f"quix-{uuid.uuid4().hex[:8]}",
                      auto_offset_reset="earliest", auto_create_topics=False, use_changelog_topics=False)
    source = app.topic(in_topic, value_deserializer="json")
    sink = app.topic(out_topic, value_serializer="json")
    state = {"count": 0, "first": None, "last": None}

    def score(row: dict) -> dict:
        if state["first"] is None:
            state["first"] = time.monotonic()
        x = np.array([[row.get(f) for f in names]], dtype=np.float64)
        result = {"id": row["id"], "score": float(booster.predict(x, num_threads=1)[0])}
        state["count"] += 1
        if state["count"] >= n:
            state["last"] = time.monotonic()
            app.stop()
        return result

    sdf = app.dataframe(source).apply(score)
    sdf.to_topic(sink)
    app.run()
    seconds = (state["last"] or time.monotonic()) - (state["first"] or time.monotonic())
    print(json.dumps({"records": state["count"], "seconds": seconds,
                      "records_per_s": state["count"] / seconds if seconds else 0.0}))


if __name__ == "__main__":
    main()
