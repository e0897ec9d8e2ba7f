"""What the tool commands share: an output file checked before any work, its write, a --data error that names
--data, and the scorer whose features ``profile`` and ``report`` read.

Trap: every error here is a ConfigError naming the option the user gave (``--output``, ``--data``), so the
command line prints one line and exits 2; nothing here prints.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from workers.errors import ConfigError
from workers.settings import Settings


def output_file(path: str, setting: str = "--output") -> str:
    """``path`` when a file can be written there; ConfigError before any work otherwise (a missing folder)."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ConfigError(setting, f"{path} is a folder; name the file to write")
    if not os.path.isdir(folder):
        raise ConfigError(setting, f"folder {os.path.dirname(path) or folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise ConfigError(setting, f"folder {os.path.dirname(path) or folder} is not writable")
    return path


def write_text(path: str, text: str, setting: str = "--output") -> None:
    try:
        with open(path, "w") as fh:
            fh.write(text)
    except OSError as exc:
        raise ConfigError(setting, f"cannot write {path}: {exc.strerror or exc}") from None


def as_data(fn: Callable) -> Any:
    """Run ``fn``; an input-listing error names --data (the option the user gave), not --input."""
    try:
        return fn()
    except ConfigError as exc:
        if exc.setting == "SCORING_BATCH__INPUT":
            raise ConfigError("--data", exc.reason) from None
        raise


def primary_scorer(settings: Settings):
    """The scorer whose features profile/report read: --model's, or the routing file's primary version's."""
    from workers.scoring.build import build_router

    return build_router(settings).primary.scorer
