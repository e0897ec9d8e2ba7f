"""Batch mode: score Parquet files into a sink, one unit per input file, resumable and shardable.

Order per file, which makes a killed run safe to start again:
  1. skip it if the ledger says it is finished with the same fingerprint (size, mtime, model version);
  2. stream its row groups through the scorer into ``sink.begin(file)``;
  3. ``commit()`` publishes the output (rename into place / transactions already committed);
  4. ``mark_done`` records it in the ledger.
A crash between any two steps leaves the file unrecorded, so the next run writes it again, and the
sink's idempotency (same file name, or upsert on (id, model_version)) keeps one copy of each row.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

from workers.drift import monitor_for
from workers.errors import InputError, RowsRejected, SinkError
from workers.model import Model
from workers.rollout.router import Router
from workers.rollout.watch import RoutingSource
from workers.runtime.progress import Progress
from workers.settings import Settings
from workers.sinks import Sink, open_result_sink
from workers.sources.parquet import InputFile, iter_batches, list_inputs, open_parquet, shard_of

log = logging.getLogger("workers.batch")


@dataclass
class BatchReport:
    files_found: int = 0
    files_in_shard: int = 0
    files_scored: int = 0
    files_skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    rows: int = 0
    rejected: int = 0
    seconds: float = 0.0
    output: str = ""
    allow_bad_rows: bool = False
    drift: dict = field(default_factory=dict)  # feature -> psi, null_share, out_of_range_share (with a profile)

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0

    @property
    def exit_code(self) -> int:
        if self.failed or (self.rejected and not self.allow_bad_rows):
            return 1
        return 0

    def summary(self) -> dict:
        return {
            "files_found": self.files_found,
            "files_in_shard": self.files_in_shard,
            "files_scored": self.files_scored,
            "files_skipped": self.files_skipped,
            "files_failed": len(self.failed),
            "rows_scored": self.rows,
            "rows_rejected": self.rejected,
            "seconds": round(self.seconds, 3),
            "rows_per_s": round(self.rows_per_s),
            "output": self.output,
            **({"drift": self.drift} if self.drift else {}),
        }


def shard_index(settings: Settings) -> int:
    if settings.batch.shard_index is not None:
        return settings.batch.shard_index
    # Kubernetes Indexed Jobs give each pod its index in this variable.
    return int(os.environ.get("JOB_COMPLETION_INDEX", "0"))


def _rejected_reason(rel: str, scored, exc: RowsRejected, show: int = 3) -> str:
    """One line: which rows of ``rel`` the store refused (by id, as row indices mean nothing to a user)."""
    ids = scored.results.column("id") if "id" in scored.results.column_names else None
    parts = []
    for i, reason in list(exc.rows.items())[:show]:
        who = repr(ids[i].as_py()) if ids is not None and 0 <= i < len(ids) else f"#{i}"
        parts.append(f"id {who}: {reason}")
    more = f" (and {len(exc.rows) - show} more)" if len(exc.rows) > show else ""
    return f"the output cannot store {len(exc.rows)} row(s) of {rel}: " + "; ".join(parts) + more


def score_file(router: Router, fs, f: InputFile, sink: Sink, batch_rows: int, progress: Progress) -> tuple[int, int]:
    """Score one input file into one sink unit; returns (rows scored and served, rows rejected)."""
    pf = open_parquet(fs, f)
    router.check_columns(pf.schema_arrow)
    columns = router.input_columns()
    bytes_per_row = f.size / max(pf.metadata.num_rows, 1)
    writer = sink.begin(f.rel)
    ok = bad = offset = 0
    try:
        for rb in iter_batches(pf, columns, batch_rows):
            carry = {c: rb.column(c) for c in router.scoring.passthrough}
            scored = router.finish(router.from_table(rb), carry)
            if scored.rejected:
                scored = scored.with_error_sources([f"{f.rel}#{offset + int(i)}" for i in scored.error_rows])
            try:
                writer.write(scored)
            except RowsRejected as exc:
                # The store cannot hold some rows as they are: retrying cannot help, so this file fails
                # alone (aborted below, never recorded as done) and the run goes on with the others.
                raise InputError(_rejected_reason(f.rel, scored, exc)) from None
            ok, bad, offset = ok + rb.num_rows - scored.rejected, bad + scored.rejected, offset + rb.num_rows
            progress.advance(rb.num_rows, int(rb.num_rows * bytes_per_row))
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    return ok, bad


def run_batch(settings: Settings, model: Model | None = None) -> BatchReport:
    b = settings.batch
    router = RoutingSource(settings, None, Router.single(model, settings.scoring) if model else None).router
    model = router.primary.model
    # Drift over the whole run (no window): the summary reports each feature against the profile.
    drift = monitor_for(settings, model, window=2**62)
    if drift is not None:
        router.primary.scorer.on_matrix = drift.observe
    fs, files = list_inputs(b.input or "", settings.s3)
    index = shard_index(settings)
    mine = [f for f in files if shard_of(f.rel, b.shard_count) == index]
    report = BatchReport(files_found=len(files), files_in_shard=len(mine), output=b.output or "",
                         allow_bad_rows=b.allow_bad_rows)
    sink = open_result_sink(settings, b.output or "", "SCORING_BATCH__OUTPUT")
    started = time.monotonic()
    log.info("batch start", extra={"files_found": len(files), "shard": f"{index}/{b.shard_count}",
                                   "files_in_shard": len(mine), "model_version": model.version, "output": sink.name,
                                   "versions": router.describe()})
    progress = Progress(b.progress, len(mine), sum(f.size for f in mine))
    try:
        sink.check()
        for f in mine:
            fingerprint = f"{f.fingerprint};model={router.fingerprint}"
            if sink.done(f.rel) == fingerprint:
                report.files_skipped += 1
                progress.file_done()
                continue
            try:
                ok, bad = score_file(router, fs, f, sink, b.batch_rows, progress)
            except InputError as exc:
                report.failed.append((f.rel, str(exc)))
                log.error("input failed", extra={"input": f.rel, "reason": str(exc)})
                continue
            sink.mark_done(f.rel, fingerprint, ok, bad)
            report.files_scored += 1
            report.rows += ok
            report.rejected += bad
            progress.file_done()
            log.debug("input done", extra={"input": f.rel, "rows": ok, "rejected": bad})
    except SinkError as exc:
        # The store failed: stop here; what was committed stays, the rest is picked up by a rerun.
        report.failed.append(("<sink>", str(exc)))
        log.error("sink failed; rerun to resume", extra={"reason": str(exc)})
    finally:
        progress.close()
        sink.close()
        report.seconds = time.monotonic() - started
        if drift is not None:
            report.drift = {k: {m: round(v, 6) for m, v in values.items()} for k, values in drift.report().items()}
    return report


