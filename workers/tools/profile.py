"""``scoring-worker profile``: a reference profile (per-feature bins, shares, null share, min/max) of reference
data, e.g. the training set, which drift metrics (stream's watcher, ``report``) compare inputs against.

The features are the primary (most-weighted served) version's with --routing, as ``report`` reads them. The
output file is checked before any data is read; no rows at all is a ConfigError naming --data.
"""

from __future__ import annotations

import click
import orjson

from workers.errors import ConfigError
from workers.settings import Settings
from workers.tools.files import as_data, output_file, primary_scorer, write_text


def write_profile(settings: Settings, data: str, out: str, bins: int, max_rows: int) -> None:
    """Profile at most ``max_rows`` rows of ``data`` into ``out``, then say how many rows of how many files."""
    import numpy as np

    from workers.scoring.drift import build_profile, feature_batches

    output_file(out)
    scorer = primary_scorer(settings)
    n_files, batches = as_data(lambda: feature_batches(scorer, data, settings.s3))
    parts, rows = [], 0
    for matrix in batches:
        parts.append(matrix)
        rows += matrix.shape[0]
        if rows >= max_rows:
            break
    if rows == 0:
        raise ConfigError("--data", f"{data}: no rows to profile ({n_files} file(s))")
    profile = build_profile(scorer.model, np.concatenate(parts)[:max_rows] if parts else np.empty((0, 0)), bins)
    write_text(out, orjson.dumps(profile, option=orjson.OPT_INDENT_2).decode())
    click.echo(f"profiled {min(rows, max_rows):,} rows of {n_files} file(s) into {out}")
