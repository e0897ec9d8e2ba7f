"""scoring-workers: score records with a LightGBM model from Kafka, Parquet files or HTTP.

The subpackages follow the data path (README "Code map"): ``sources`` (Kafka, Parquet) -> ``decode`` (JSON
records, OIP tensors, CloudEvents) -> ``scoring`` (model, scorer, router: every mode scores through
``scoring.build.build_router``) -> ``sinks`` (Parquet, PostgreSQL, SQLite, Kafka, dead letters) -> ``runtime``
(batch, batch-queue, stream, serve: the loops that order those steps and commit only after the sink has the
results). ``tools`` holds the commands beside the modes.
"""

__version__ = "0.1.0"
