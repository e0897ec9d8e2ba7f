"""Batch mode: score Parquet files into a sink, one unit per input file (or row-group range of a large one),
resumable and shardable.

Order per file, which makes a killed run safe to start again:
  1. skip it if the ledger says it is finished with the same fingerprint (size, mtime, model version);
  2. stream its row groups through the scorer into ``sink.begin(file)``;
  3. ``commit()`` publishes the output (rename into place / transactions already committed);
  4. ``mark_done`` records it in the ledger.
The ledger is the sink's (``Sink.ledger()``); a sink that keeps none (``kafka://``) is refused at start-up by
``batch_ledger``, before any input is read (exit 2), never by a failure mid-run.
A crash between any two steps leaves the file unrecorded, so the next run writes it again, and the
sink's idempotency (same file name, or upsert on (id, model_version)) keeps one copy of each row.

A file's unit (its output name, ledger entry, errors' source and shard) is its canonical location, so runs
from different input roots into one output never replace each other and a rerun from another spelling of
the same root still finds its files finished. Before anything is written, ``check_layout`` refuses an
output that could land on an input (exit 2), and the listing leaves out the output's own files.
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from itertools import chain

import click
import orjson
import pyarrow as pa
import pyarrow.fs as pafs

from workers import tracing
from workers.errors import ConfigError, InputError, RowsRejected, ScoringError, SinkError
from workers.runtime.progress import Progress
from workers.runtime.write_behind import WriteBehind
from workers.scoring.build import build_router
from workers.scoring.model import Model
from workers.scoring.router import Router
from workers.settings import Settings, env_name, job_completion_index
from workers.sinks import Ledger, Sink, open_result_sink
from workers.sources.parquet import (
    Listing,
    Prefetch,
    duplicated_columns,
    find_inputs,
    iter_batches,
    open_parquet,
    plain_batch,
)
from workers.sources.units import Unit, plan
from workers.storage import canonical, inside, redact

log = logging.getLogger("workers.batch")


@dataclass
class BatchReport:
    files_found: int = 0
    files_in_shard: int = 0
    units_in_shard: int = 0  # files, or row-group ranges of large files (``sources.units``)
    files_scored: int = 0
    files_skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    rows: int = 0
    rejected: int = 0
    seconds: float = 0.0
    output: str = ""
    allow_bad_rows: bool = False
    drift: dict = field(default_factory=dict)  # feature -> psi, null_share, out_of_range_share (with a profile)
    shadow_skipped: Counter = field(default_factory=Counter)  # shadow version -> rows it could not score
    duplicates_collapsed: int = 0  # rows a table sink dropped for a later row of the same key in the same file

    def add(self, result: FileResult) -> None:
        """Count one scored file."""
        self.files_scored += 1
        self.rows += result.scored
        self.rejected += result.rejected
        self.shadow_skipped.update(result.shadow_skipped)

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
            "units_in_shard": self.units_in_shard,
            "files_scored": self.files_scored,
            "files_skipped": self.files_skipped,
            "files_failed": len(self.failed),
            "rows_scored": self.rows,
            "rows_rejected": self.rejected,
            "duplicates_collapsed": self.duplicates_collapsed,
            "seconds": round(self.seconds, 3),
            "rows_per_s": round(self.rows_per_s),
            "output": self.output,
            # Rows a shadow version could not score (a feature column the file lacks, a value it cannot decode,
            # its predict failing): skipped, never failing the served results.
            **({"shadow_rows_skipped": dict(sorted(self.shadow_skipped.items()))} if self.shadow_skipped else {}),
            **({"drift": self.drift} if self.drift else {}),
        }


def shard_index(settings: Settings) -> int:
    if settings.batch.shard_index is not None:
        return settings.batch.shard_index
    # Kubernetes Indexed Jobs give each pod its index in this variable (validated: ConfigError when garbage).
    index = job_completion_index()
    return 0 if index is None else index


def _rejected_reason(rel: str, scored, exc: RowsRejected, show: int = 3) -> str:
    """One line: which rows of ``rel`` the store refused (by id, as row indices mean nothing to a user)."""
    ids = scored.results.column("id") if "id" in scored.results.column_names else None
    parts = []
    for i, reason in list(exc.rows.items())[:show]:
        who = repr(ids[i].as_py()) if ids is not None and 0 <= i < len(ids) else f"#{i}"
        parts.append(f"id {who}: {reason}")
    more = f" (and {len(exc.rows) - show} more)" if len(exc.rows) > show else ""
    return f"the output cannot store {len(exc.rows)} row(s) of {rel}: " + "; ".join(parts) + more


OUTPUT_SETTING = "SCORING_BATCH__OUTPUT"


def batch_ledger(sink: Sink, setting: str = OUTPUT_SETTING) -> Ledger:
    """The sink's batch ledger; ConfigError naming ``setting`` (exit 2) when the sink cannot keep one."""
    ledger = sink.ledger()
    if ledger is None:
        from workers.sinks.shadow import SplitSink

        shown = sink.main.name if isinstance(sink, SplitSink) else sink.name  # the ledger is the main sink's
        raise ConfigError(setting, f"{shown} cannot keep the batch ledger (which inputs are finished), so a "
                                   "rerun could not resume; batch output goes to a folder, s3://, postgresql://, "
                                   "mysql://, sqlite:// or redis://")
    return ledger


def open_batch_sink(settings: Settings, setting: str = OUTPUT_SETTING) -> tuple[Sink, Ledger]:
    """The result sink of a batch run and its ledger; the sink is closed again when it keeps none."""
    sink = open_result_sink(settings, settings.batch.output or "", setting)
    try:
        return sink, batch_ledger(sink, setting)
    except BaseException:
        sink.close()
        raise


@dataclass(frozen=True)
class OutputPlace:
    """A place in a filesystem this run writes to."""

    setting: str
    uri: str
    root: str  # canonical location
    dataset: bool  # a Parquet dataset root; False: an SQLite database file (or its -wal/-shm/-journal)


def output_places(settings: Settings) -> list[OutputPlace]:
    """The Parquet dataset roots, SQLite database files and Delta and Iceberg table folders (results, errors,
    ledger; their data files are Parquet) of the result and shadow sinks (server stores and topics cannot meet an
    input file)."""
    places = []
    for setting, uri in ((OUTPUT_SETTING, settings.batch.output),
                         ("SCORING_ROUTING__SHADOW_SINK", settings.routing.shadow_sink)):
        if not uri:
            continue
        scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
        if scheme in ("", "file", "s3"):
            places.append(OutputPlace(setting, uri, canonical(uri), True))
        elif scheme == "sqlite":
            path = uri.split("://", 1)[1].split("?", 1)[0]
            path = path[1:] if path.startswith("/") else path  # sqlite:///relative.db, sqlite:////abs.db
            if path and path != ":memory:":
                db = canonical(path)
                places += [OutputPlace(setting, uri, db + end, False) for end in ("", "-wal", "-shm", "-journal")]
        elif scheme in ("delta+file", "delta+s3"):
            from workers.sinks.delta import delta_location

            table = delta_location(uri, setting)
            places += [OutputPlace(setting, uri, canonical(table + end), False) for end in ("", "_errors", "_inputs")]
        elif scheme == "iceberg":
            from workers.sinks.iceberg import iceberg_location, warehouse_location

            _, namespace, name = iceberg_location(uri, setting)
            table = f"{warehouse_location(settings.iceberg)}/{namespace.replace('.', '/')}/{name}"
            places += [OutputPlace(setting, uri, canonical(table + end), False) for end in ("", "_errors", "_inputs")]
    return places


def _ours(listing: Listing, place: OutputPlace) -> set[str]:
    """Canonical locations under a dataset root that are results of ours: those this run's inputs would
    write, and those the root's ledger records."""
    from workers.sinks.parquet import ledger_file, result_name

    names = {result_name(f.source) for f in listing.files}
    names |= {result_name(f.source) for f in listing.excluded}  # an output of an excluded file is ours too
    state = place.root[len("s3://"):] if place.root.startswith("s3://") else place.root
    try:
        entries = listing.fs.get_file_info(pafs.FileSelector(f"{state}/_state", allow_not_found=True))
        recorded = {e.base_name for e in entries}
    except OSError:
        recorded = set()
    ours = {f"{place.root}/{n}" for n in names}
    for f in listing.excluded:
        if not f.source.startswith(place.root + "/"):
            continue
        rel = f.source[len(place.root) + 1:]
        part = _PART.fullmatch(rel)  # a row-group range of an input whose whole results name is ours
        if ledger_file(rel) in recorded or (part is not None and f"{part[1]}.parquet" in names):
            ours.add(f.source)
    return ours


_PART = re.compile(r"(.*)\.row-groups-[0-9]+-[0-9]+-of-[0-9]+\.parquet")


def check_layout(spec: str, listing: Listing, places: list[OutputPlace]) -> None:
    """Refuse, before anything is written, an output that could land on an input (ConfigError: exit 2).

    - A dataset root that is the input root (a folder, a single file's folder, a glob's fixed prefix) or
      contains it: results would be written among the inputs (with ``--output /`` onto them).
    - A dataset root inside the input root is allowed: the listing leaves it out, so its results never become
      inputs; unless it already holds input files that are not results of ours, which would never be scored.
    - An SQLite database that is the only input named.
    """
    for place in places:
        shown = redact(place.uri)
        if (place.dataset or place.uri.startswith(("delta+", "iceberg:"))) and inside(listing.root, place.root):
            raise ConfigError(place.setting, f"{shown} is the input folder {listing.root} or contains it: results "
                                             f"would be written among the inputs; choose an output outside it")
        mine = [f for f in listing.excluded if inside(f.source, place.root)]
        if not mine:
            continue
        if not place.dataset:
            if not listing.files:
                raise ConfigError(place.setting, f"{shown} is the database the output goes to, and the only "
                                                 f"input {spec} names")
            continue
        ours = _ours(listing, place)
        foreign = [f for f in mine if f.source not in ours]
        if foreign:
            raise ConfigError(place.setting, f"{shown} is inside the input {listing.root} and holds "
                                             f"{len(foreign)} input file(s) that are not its results (e.g. "
                                             f"{foreign[0].rel}), which would never be scored; choose an output "
                                             f"folder of its own")


@dataclass
class FileResult:
    scored: int  # rows scored and served
    rejected: int  # rows rejected
    shadow_skipped: Counter = field(default_factory=Counter)  # shadow version -> rows it could not score
    duplicates_collapsed: int = 0  # rows a table sink dropped for a later row of the same key in the same file


# What the data of one file can raise from Arrow, numpy or LightGBM beyond the reasons we give on purpose (an
# Arrow kernel missing for a type, a conversion that does not fit...): that file fails alone with this reason.
_DATA_ERRORS = (pa.ArrowException, KeyError, ValueError, TypeError, IndexError, OverflowError)


def score_file(router: Router, fs, unit: Unit, sink: Sink, batch_rows: int, progress: Progress,
               prefetch: Prefetch | None = None, upcoming: Unit | None = None) -> FileResult:
    """Score one unit (an input file, or a range of its row groups) into one sink unit of the same name;
    ``prefetch`` holds it if it was opened ahead, and opens ``upcoming`` (the next unit) while the last batch
    of this one is scored.

    Raises InputError for anything wrong with the file's data, so the run goes on with the other units;
    SinkError (the store failed) propagates."""
    with tracing.span("batch file", input=unit.name, sink=sink.name, model_version=router.primary.model.version,
                      bytes=unit.size) as span:
        try:
            result = _score_file(router, fs, unit, sink, batch_rows, progress, prefetch, upcoming)
        except (ScoringError, OSError):  # ours (InputError, SinkError...) or I/O: as they are
            raise
        except _DATA_ERRORS as exc:
            log.debug("input data error", exc_info=True, extra={"input": unit.rel})
            raise InputError(f"cannot score {unit.rel}: {type(exc).__name__}: {str(exc)[:300]}") from None
        if span is not None:
            span.set_attributes({"scoring.rows": result.scored, "scoring.rejected": result.rejected})
        return result


def _score_file(router: Router, fs, unit: Unit, sink: Sink, batch_rows: int, progress: Progress,
                prefetch: Prefetch | None, upcoming: Unit | None) -> FileResult:
    f = unit.file
    opened = prefetch.take(unit) if prefetch is not None else None
    pf = opened.pf if opened is not None else open_parquet(fs, f)
    try:
        schema = pf.schema_arrow
    except (pa.ArrowException, ValueError) as exc:
        raise InputError(f"cannot read the schema of {f.rel}: {str(exc)[:300]}") from None
    twice = duplicated_columns(schema, router.input_columns())
    if twice:
        raise InputError(f"{f.rel} has more than one column named {', '.join(repr(c) for c in twice)}; "
                         "which one to score is ambiguous, rename or drop the others")
    absent = router.check_columns(pf.schema_arrow)
    for name, missing in absent.items():
        log.warning("shadow version skipped for this input", extra={"input": f.rel, "model_version": name,
                                                                    "reason": missing})
    columns = router.input_columns(pf.schema_arrow)
    bytes_per_row = f.size / max(pf.metadata.num_rows, 1)
    before = router.skipped.copy()
    writer = sink.begin(unit.name)
    # Results are written on a thread of their own while the next batch is scored (sinks that allow it).
    writes = WriteBehind(writer, lambda scored, exc: _rejected_reason(unit.rel, scored, exc),
                         threaded=sink.concurrent_writes)
    n_scored = n_rejected = 0
    offset = unit.first_row  # error sources name rows by their index in the file
    # An input without rows (no row groups, or empty ones) is scored as one empty batch of its schema, so its
    # output has the results' columns and no rows: one output per input, and readers see it was scored.
    empty = plain_batch(pa.RecordBatch.from_pylist([], schema=pa.schema([schema.field(c) for c in columns])))
    started = opened.started if opened is not None and opened.columns == columns else None
    on_end = (lambda: prefetch.start(upcoming)) if prefetch is not None and upcoming is not None else None
    batches = iter_batches(pf, columns, batch_rows, unit.row_groups, started, on_end)
    try:
        for rb in chain(batches, [empty]):
            if rb is empty and offset > unit.first_row:
                break
            with tracing.span("row group batch", first_row=offset) as span:
                scored = router.score_table(rb)
                if scored.num_errors:
                    scored = scored.with_error_sources([f"{f.source}#{offset + int(i)}" for i in scored.error_rows])
                if span is not None:
                    span.set_attributes({"scoring.rows": rb.num_rows - scored.num_errors,
                                         "scoring.rejected": scored.num_errors})
            # Rows the store cannot hold fail this file alone (InputError naming them, raised here or at the
            # next write: aborted below, never recorded as done) and the run goes on with the others.
            writes.write(scored)
            n_scored += rb.num_rows - scored.num_errors
            n_rejected += scored.num_errors
            offset += rb.num_rows
            progress.advance(rb.num_rows, int(rb.num_rows * bytes_per_row))
        writes.wait()
        writer.commit()
    except BaseException:
        writes.settle()  # a write still running ends before the unit is aborted under it
        writer.abort()
        raise
    finally:
        batches.close()  # its reader stops now, not when the failing unit's traceback lets go of it
        writes.close()
    return FileResult(n_scored, n_rejected, router.skipped - before)


def _replaced_meanwhile(ledger: Ledger, marked: list[tuple[Unit, str]], report: BatchReport) -> None:
    """Check at the end of a run that every unit it recorded is still recorded. Gone: another run into this
    output, cut otherwise (another ``SCORING_BATCH__UNIT_BYTES``) and running at the same time, removed its
    results when it published the ranges that overlap (the sinks do, so a recut file leaves no stale rows).
    Reported done, those rows were missing until a rerun; failed, the Job retries and the rerun scores them.
    Recorded with another fingerprint: another run (another model, or the input file changed) stored its own
    results for the unit, which are there: a warning, not a failure (a retry would only replace them back).
    The table sinks upsert on the row's key, so another cut there removes nothing; a lake sink's ledger, read
    once per run, is read again here for the warning."""
    if marked:
        ledger.refresh()
    for u, fingerprint in marked:
        try:
            now = ledger.done(u.name)
        except InputError:
            continue  # a name taken by another input: reported when that input is scored
        if now is None:
            reason = ("its results were removed meanwhile by another run into this output, cut with another "
                      "SCORING_BATCH__UNIT_BYTES; rerun (and give every run into one output the same unit_bytes)")
            report.failed.append((u.rel, reason))
            log.error("input failed", extra={"input": u.rel, "reason": reason})
        elif now != fingerprint:
            log.warning("recorded meanwhile by another run into this output (another model version or input "
                        "file): a rerun with this model and input scores it again", extra={"input": u.rel})


def run_batch(settings: Settings, model: Model | None = None) -> BatchReport:
    b = settings.batch
    # Drift over the whole run (no window): the summary reports each feature against the profile.
    router = build_router(settings, model=model, drift_window=2**62)
    model = router.primary.model
    places = output_places(settings)
    listing = find_inputs(b.input or "", settings.s3, exclude=tuple(p.root for p in places))
    check_layout(b.input or "", listing, places)
    fs, files = listing.fs, listing.files
    index = shard_index(settings)
    mine = plan(fs, files, b.unit_bytes, b.shard_count)[index]
    report = BatchReport(files_found=len(files), files_in_shard=len({u.file.source for u in mine}),
                         units_in_shard=len(mine), output=redact(b.output or ""), allow_bad_rows=b.allow_bad_rows)
    sink, ledger = open_batch_sink(settings)
    started = time.monotonic()
    log.info("batch start", extra={"files_found": len(files), "shard": f"{index}/{b.shard_count}",
                                   "files_in_shard": report.files_in_shard, "units_in_shard": len(mine),
                                   "model_version": model.version, "output": sink.name,
                                   "versions": router.describe()})
    progress = Progress(b.progress, len(mine), sum(u.size for u in mine))
    prefetch = Prefetch(fs, router.input_columns, b.batch_rows)

    known: dict[int, bool] = {}  # unit index -> finished by an earlier run (asked once: a ledger read may be I/O)

    def fingerprint_of(u: Unit) -> str:
        return f"{u.file.fingerprint};model={router.fingerprint}"

    def finished(i: int) -> bool:
        if i not in known:
            u = mine[i]
            fingerprint = fingerprint_of(u)
            # A range is also finished when an earlier run (before the file was cut) scored it whole.
            known[i] = ledger.done(u.name) == fingerprint or (
                not u.whole and ledger.done(u.file.source) == fingerprint)
        return known[i]

    def upcoming(i: int) -> Unit | None:
        """The unit after ``i`` when it is to be scored (opened ahead meanwhile), else None."""
        try:
            return mine[i + 1] if i + 1 < len(mine) and not finished(i + 1) else None
        except ScoringError:  # its own turn reports it
            return None

    marked: list[tuple[Unit, str]] = []  # units this run scored and recorded
    try:
        sink.check()
        for i, u in enumerate(mine):
            fingerprint = fingerprint_of(u)
            try:
                if finished(i):
                    report.files_skipped += 1
                    progress.file_done()
                    continue
                result = score_file(router, fs, u, sink, b.batch_rows, progress, prefetch, upcoming(i))
                ledger.mark_done(u.name, fingerprint, result.scored, result.rejected)  # InputError: removed meanwhile
            except InputError as exc:
                report.failed.append((u.rel, str(exc)))
                log.error("input failed", extra={"input": u.rel, "reason": str(exc)})
                continue
            marked.append((u, fingerprint))
            report.add(result)
            progress.file_done()
            log.debug("input done", extra={"input": u.rel, "rows": result.scored, "rejected": result.rejected})
        _replaced_meanwhile(ledger, marked, report)
    except SinkError as exc:
        # The store failed: stop here; what was committed stays, the rest is picked up by a rerun.
        report.failed.append(("<sink>", str(exc)))
        log.error("sink failed; rerun to resume", extra={"reason": str(exc)})
    finally:
        prefetch.close()
        progress.close()
        report.duplicates_collapsed = sink.duplicates_collapsed  # read before close: the sink's count
        sink.close()
        report.seconds = time.monotonic() - started
        if router.drift is not None:
            report.drift = {k: {m: round(v, 6) for m, v in values.items()}
                            for k, values in router.drift.report().items()}
    return report


def batch_command(settings: Settings) -> int:
    """``scoring-worker batch``: check the required settings, run (from --input, or from the queue topic), print
    the summary as JSON on stdout and one line per failed file on stderr; the exit code (BatchReport's)."""
    required = [(("batch", "output"), "--output")]
    if not settings.batch.queue_topic:
        required.append((("batch", "input"), "--input"))
    for path, flag in required:
        if not getattr(settings.batch, path[1]):
            raise ConfigError(env_name(path), f"required (set {flag} or {env_name(path)})")
    with tracing.span("batch run", output=redact(settings.batch.output or ""),
                      shard=f"{shard_index(settings)}/{settings.batch.shard_count}") as span:
        if settings.batch.queue_topic:
            from workers.runtime.batch_queue import run_batch_queue

            report = run_batch_queue(settings)
        else:
            report = run_batch(settings)
        if span is not None:  # the run's counts; files that failed make it an error span, naming the first
            span.set_attributes({f"scoring.{k}": v for k, v in report.summary().items() if isinstance(v, int)})
            if report.failed:
                tracing.set_error(span, f"{len(report.failed)} input(s) failed, first {report.failed[0][0]}: "
                                        f"{report.failed[0][1]}")
    summary = report.summary()
    summary["output"] = redact(summary.get("output") or "")  # the logs redact it; so must the summary
    if report.failed:
        summary["failures"] = [{"input": rel, "reason": reason} for rel, reason in report.failed]
    click.echo(orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode())
    for rel, reason in report.failed:
        click.echo(f"failed: {rel}: {' '.join(reason.split())}", err=True)  # one line per file
    if report.rejected and not report.allow_bad_rows:
        click.echo(f"rejected {report.rejected} rows: see the errors output (or pass --allow-bad-rows)", err=True)
    return report.exit_code
