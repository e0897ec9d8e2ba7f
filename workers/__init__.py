"""scoring-workers: score records with a LightGBM model from Kafka, Parquet files or HTTP."""

__version__ = "0.1.0"
