"""Sources yield batches of records: Parquet files (batch mode) and Kafka topics (stream mode)."""
