"""Scoring Arrow tables in tests through the production path: ``Router.single(...).score_table``, what batch
mode runs for every row group (not a test-only shortcut of the scorer)."""

from __future__ import annotations

import pyarrow as pa

from workers.scoring.model import Model
from workers.scoring.router import Router
from workers.scoring.scorer import Scored
from workers.settings import ScoringSettings


class TableScorer:
    def __init__(self, model: Model, id_column: str = "id", passthrough: list[str] | None = None,
                 explain: str = "none", explain_top_k: int = 5):
        scoring = ScoringSettings.model_construct(**{**ScoringSettings().model_dump(), "id_column": id_column,
                                                     "passthrough": list(passthrough or []), "explain": explain,
                                                     "explain_top_k": explain_top_k})
        self.router = Router.single(model, scoring)
        self.model = model

    def score(self, table: pa.Table | pa.RecordBatch, carry: dict | None = None) -> Scored:
        return self.router.score_table(table, carry)

    def __getattr__(self, name: str):  # features, check_columns, ... of the one version's scorer
        return getattr(self.router.primary.scorer, name)
