"""Stream mode: a Kafka consumer group that scores micro-batches, stores them, then commits."""
