"""scoring-workers: score records with a LightGBM model from Kafka, Parquet files or HTTP.

The subpackages follow the data path (README "Code map"): ``sources`` (Kafka, Parquet) -> ``decode`` (JSON
records, OIP tensors, CloudEvents) -> ``scoring`` (model, scorer, router: every mode scores through
``scoring.build.build_router``) -> ``sinks`` (Parquet, PostgreSQL, SQLite, Kafka, dead letters) -> ``runtime``
(batch, batch-queue, stream, serve: the loops that order those steps and commit only after the sink has the
results). ``tools`` holds the commands beside the modes.
"""

import os
import sys

# pyarrow's allocator (mimalloc) keeps freed pages for a while before it returns them; with a batch's buffers
# freed and allocated again every row group, that showed as peak RSS growing with the file (1M rows 12% above
# 100k rows, #19). Returning them at once: 5% above, no throughput change measured (compiled batch, 4 runs
# interleaved). Only before pyarrow loads (mimalloc reads it then): the commands import this package first; a
# program importing pyarrow before it sets MIMALLOC_PURGE_DELAY=0 itself. A value in the environment wins.
if "pyarrow" not in sys.modules:
    os.environ.setdefault("MIMALLOC_PURGE_DELAY", "0")

__version__ = "0.1.0"
