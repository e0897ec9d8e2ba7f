"""The command line: ``scoring-worker batch | stream | serve | check | ...`` (``--help`` lists them).

Each flag is generated from a settings field (workers/cli_options.py), so its help is the field's docstring
and names the env var; a flag given on the command line overrides the env var. A user mistake ends with one
line on stderr naming the setting or option and exit code 2 (a wrong setting or usage) or 1 (failed inputs,
an unreachable service, a failed check), never a traceback; tests/test_user_mistakes.py holds that.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import click
import orjson

from workers import __version__
from workers.cli_options import (  # noqa: F401 - FLAGS, _overrides, click_type: used by tests and other tools
    FLAGS,
    _overrides,
    click_type,
    common,
    kafka_options,
    model_options,
    s3_options,
    setting,
    with_settings,
)
from workers.errors import ConfigError, ScoringError
from workers.logs import setup_logging
from workers.settings import Settings, env_name, redact


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="scoring-worker")
def cli() -> None:
    """Score records with a LightGBM model: Parquet files (batch), Kafka topics (stream), HTTP (serve).

    Every option is also an env var (shown in brackets); S3 keys come only from env vars
    (SCORING_S3__ACCESS_KEY_ID, SCORING_S3__SECRET_ACCESS_KEY) or the AWS credential chain.

    Exit codes: 0 done; 1 failed inputs, an unreachable service or a failed check; 2 a wrong setting or usage
    (one line naming it).
    """


@cli.command()
@common
@setting("--input", "batch.input")
@setting("--output", "batch.output")
@setting("--batch-rows", "batch.batch_rows")
@setting("--shard-index", "batch.shard_index")
@setting("--shard-count", "batch.shard_count")
@setting("--allow-bad-rows", "batch.allow_bad_rows", is_flag=True)
@setting("--progress", "batch.progress")
@setting("--queue-topic", "batch.queue_topic")
@setting("--queue-group", "batch.queue_group")
@setting("--idle-exit-s", "batch.idle_exit_s")
@setting("--bootstrap-servers", "kafka.bootstrap_servers")
@with_settings
def batch(settings: Settings) -> None:
    """Score Parquet files into a Parquet dataset, PostgreSQL or SQLite. Reruns resume.

    With --queue-topic, the files come from "file arrived" events on a Kafka topic instead of --input,
    and the run ends when the topic is drained (for a KEDA ScaledJob).
    """
    from workers.runtime.batch import run_batch

    required = [(("batch", "output"), "--output")]
    if not settings.batch.queue_topic:
        required.append((("batch", "input"), "--input"))
    for path, flag in required:
        if not getattr(settings.batch, path[1]):
            raise ConfigError(env_name(path), f"required (set {flag} or {env_name(path)})")
    if settings.batch.queue_topic:
        from workers.runtime.batch_queue import run_batch_queue

        report = run_batch_queue(settings)
    else:
        report = run_batch(settings)
    summary = report.summary()
    summary["output"] = redact(summary.get("output") or "")  # the logs redact it; so must the summary
    if report.failed:
        summary["failures"] = [{"input": rel, "reason": reason} for rel, reason in report.failed]
    click.echo(orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode())
    for rel, reason in report.failed:
        click.echo(f"failed: {rel}: {' '.join(reason.split())}", err=True)  # one line per file
    if report.rejected and not report.allow_bad_rows:
        click.echo(f"rejected {report.rejected} rows: see the errors output (or pass --allow-bad-rows)", err=True)
    sys.exit(report.exit_code)


@cli.command()
@common
@kafka_options
@with_settings
def stream(settings: Settings) -> None:
    """Consume JSON records from Kafka, score micro-batches, store results, then commit offsets.

    The SASL password comes only from SCORING_KAFKA__SASL_PASSWORD (never a flag, never logged).
    """
    from workers.runtime.stream.worker import run_stream

    sys.exit(run_stream(settings))


@cli.command()
@common
@setting("--host", "serve.host")
@setting("--port", "serve.port")
@setting("--model-name", "serve.model_name")
@setting("--max-batch-rows", "serve.max_batch_rows")
@setting("--max-latency-ms", "serve.max_latency_ms")
@setting("--max-body-bytes", "serve.max_body_bytes")
@setting("--reply-type", "serve.reply_type")
@setting("--sink", "serve.sink")
@with_settings
def serve(settings: Settings) -> None:
    """HTTP for Knative: the Open Inference Protocol (KServe v2) and CloudEvents (KafkaSource)."""
    from workers.runtime.serve.app import run_serve

    _port_free(settings.serve.host, settings.serve.port, "SCORING_SERVE__PORT")
    sys.exit(run_serve(settings))


def _port_free(host: str, port: int, setting: str) -> None:
    """ConfigError naming ``setting`` when ``host:port`` is taken or ``host`` is not an address of this
    machine. uvicorn would only log the bind error after loading the model and exit 3; this says it in one
    line first (a port taken in between still gets uvicorn's line). Other bind failures (a privileged port
    without the right) are left to the server, after the settings' other checks."""
    import errno
    import socket

    if port == 0:
        return
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is free
            sock.bind((host, port))
    except socket.gaierror as exc:
        raise ConfigError("SCORING_SERVE__HOST", f"cannot listen on {host}: {exc.strerror or exc}") from None
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(setting, f"cannot listen on {host}:{port}: {exc.strerror}") from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise ConfigError("SCORING_SERVE__HOST", f"cannot listen on {host}: {exc.strerror}") from None


@cli.command()
@common
@kafka_options
@setting("--output", "batch.output")
@with_settings
def check(settings: Settings) -> None:
    """Load the settings and the model, reach the broker and the sink: one line per check, exit 0 or 1.

    The sink checked is --sink with --topic (stream), else --output when given (batch), else --sink; and the
    --shadow-sink. Nothing is created: a database or folder that does not exist yet passes if it can be made.
    """
    from workers.runtime.check import run_checks

    sys.exit(run_checks(settings))


@cli.command()
@click.option("--dir", "folder", default="scoring-demo", show_default=True, help="Folder the demo writes into.")
@click.option("--rows", default=200_000, show_default=True, help="Rows of generated input data.")
def demo(folder: str, rows: int) -> None:
    """Train a small model on generated data, write Parquet inputs, score them, report where and how fast."""
    from workers.tools.demo import run_demo

    setup_logging("WARNING")
    run_demo(folder, rows)


@cli.command("produce")
@click.option("--bootstrap-servers", default="127.0.0.1:9092", show_default=True)
@click.option("--topic", required=True, help="Topic to write (created if missing).")
@click.option("--input", "source", required=True, help="Parquet file or directory whose rows become records.")
@click.option("--partitions", default=6, show_default=True, help="Partitions when the topic is created.")
@click.option("--bad", default=0, show_default=True, help="Also send this many malformed records.")
@click.option("--limit", type=int, default=None, help="Stop after this many rows.")
@click.option("--id-column", default="id", show_default=True)
def produce_cmd(bootstrap_servers: str, topic: str, source: str, partitions: int, bad: int, limit: int | None,
                id_column: str) -> None:
    """Publish Parquet rows as JSON records (a tool for trying stream mode; not used in production)."""
    from workers.tools.produce import produce

    setup_logging("WARNING")
    produce(bootstrap_servers, topic, source, partitions, bad, limit, id_column)


def _output_file(path: str, setting: str = "--output") -> str:
    """``path`` when a file can be written there; ConfigError before any work otherwise (a missing folder)."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ConfigError(setting, f"{path} is a folder; name the file to write")
    if not os.path.isdir(folder):
        raise ConfigError(setting, f"folder {os.path.dirname(path) or folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise ConfigError(setting, f"folder {os.path.dirname(path) or folder} is not writable")
    return path


def _write(path: str, text: str, setting: str = "--output") -> None:
    try:
        with open(path, "w") as fh:
            fh.write(text)
    except OSError as exc:
        raise ConfigError(setting, f"cannot write {path}: {exc.strerror or exc}") from None


def _since(text: str | None):
    from workers.tools.compare import parse_since

    return parse_since(text) if text else None


def _primary_scorer(settings: Settings):
    """The scorer whose features profile/report read: --model's, or the routing file's primary version's."""
    from workers.scoring.build import build_router

    return build_router(settings).primary.scorer


@cli.command("compile")
@model_options
@setting("--routing", "routing.path")
@s3_options
@with_settings
def compile_cmd(settings: Settings) -> None:
    """Compile the model (with --routing: every version's) with lleaves into the cache (e.g. in an init
    container or at image build)."""
    from workers.scoring.model import load_model

    wanted = [settings.model]
    if settings.routing.path:
        from workers.scoring.routing_spec import read_routing

        spec, _ = read_routing(settings.routing.path)
        wanted = [settings.model.model_copy(update={"path": v.model, "sha256": v.sha256, "version": v.name})
                  for v in spec.versions]
    failed = 0
    for model_settings in wanted:
        model = load_model(model_settings.model_copy(update={"backend": "lleaves"}), settings.s3)
        if model.backend != "lleaves":
            click.echo(f"error: could not compile {model.source} with lleaves (see the warning above)", err=True)
            failed += 1
            continue
        click.echo(f"compiled {model.source} ({model.version}) into {settings.model.cache_dir}")
    if failed:
        sys.exit(1)


@cli.command("profile")
@model_options
@setting("--routing", "routing.path")
@setting("--id-column", "scoring.id_column")
@s3_options
@click.option("--data", required=True, help="Reference Parquet data (file, folder or glob), e.g. the training set.")
@click.option("--output", "out", required=True, help="Where to write the profile JSON.")
@click.option("--bins", default=10, show_default=True, type=click.IntRange(2, 1000),
              help="Quantile bins per numeric feature.")
@click.option("--max-rows", default=1_000_000, show_default=True, type=click.IntRange(1),
              help="Rows sampled from the data at most.")
@with_settings
def profile_cmd(settings: Settings, data: str, out: str, bins: int, max_rows: int) -> None:
    """Compute a reference profile (per-feature bins, shares, null share, min/max) for drift metrics.

    With --routing, the profile is of the primary (most-weighted served) version's features, as `report` reads.
    """
    import numpy as np

    from workers.scoring.drift import build_profile, feature_batches

    _output_file(out)
    scorer = _primary_scorer(settings)
    n_files, batches = _as_data(lambda: feature_batches(scorer, data, settings.s3))
    parts, rows = [], 0
    for matrix in batches:
        parts.append(matrix)
        rows += matrix.shape[0]
        if rows >= max_rows:
            break
    if rows == 0:
        raise ConfigError("--data", f"{data}: no rows to profile ({n_files} file(s))")
    profile = build_profile(scorer.model, np.concatenate(parts)[:max_rows] if parts else np.empty((0, 0)), bins)
    _write(out, orjson.dumps(profile, option=orjson.OPT_INDENT_2).decode())
    click.echo(f"profiled {min(rows, max_rows):,} rows of {n_files} file(s) into {out}")


def _as_data(fn: Callable) -> Any:
    """Run ``fn``; an input-listing error names --data (the option the user gave), not --input."""
    try:
        return fn()
    except ConfigError as exc:
        if exc.setting == "SCORING_BATCH__INPUT":
            raise ConfigError("--data", exc.reason) from None
        raise


@cli.command("schema")
@model_options
@setting("--id-column", "scoring.id_column")
@setting("--passthrough", "scoring.passthrough")
@s3_options
@click.option("--check", "producer", default=None,
              help="A producer's JSON Schema to check against the model instead: one line per mismatch, exit 1 "
                   "when records shaped like it would be rejected.")
@with_settings
def schema_cmd(settings: Settings, producer: str | None) -> None:
    """Print a JSON Schema for input records of the model (id, features and types, categories, nulls)."""
    from workers.scoring.model import load_model
    from workers.tools.schema import check_producer, input_schema

    model = load_model(settings.model, settings.s3)
    if producer:
        try:
            with open(producer, "rb") as fh:
                theirs = orjson.loads(fh.read())
        except (OSError, orjson.JSONDecodeError) as exc:
            raise ConfigError("--check", f"cannot read {producer} as JSON: {exc}") from None
        _object_schema(theirs, producer)
        errors, warnings = check_producer(theirs, model, settings.scoring.id_column)
        for line in errors:
            click.echo(f"error: {line}")
        for line in warnings:
            click.echo(f"warning: {line}")
        click.echo(f"{producer}: {len(errors)} error(s), {len(warnings)} warning(s) against {model.version}")
        sys.exit(1 if errors else 0)
    schema = input_schema(model, settings.scoring.id_column, settings.scoring.passthrough)
    click.echo(orjson.dumps(schema, option=orjson.OPT_INDENT_2).decode())


def _object_schema(schema: Any, origin: str) -> None:
    """ConfigError unless ``schema`` is shaped like a JSON Schema of an object (what `schema --check` reads)."""
    problem = None
    if not isinstance(schema, dict):
        problem = f"it is a JSON {type(schema).__name__}, not an object"
    elif not isinstance(schema.get("properties", {}), dict):
        problem = "'properties' is not an object"
    elif not all(isinstance(v, dict | bool) for v in schema.get("properties", {}).values()):
        problem = "a property's schema is not an object"
    elif not isinstance(schema.get("required", []), list):
        problem = "'required' is not a list"
    if problem:
        raise ConfigError("--check", f"{origin} is not a JSON Schema of records: {problem}")


SINCE_HELP = ("Only rows scored at or after this time: ISO 8601 (2026-11-25T10:00, UTC unless it has an offset) "
              "or a duration ago (30m, 2h, 7d).")


@cli.command("compare")
@click.option("--results", required=True,
              help="Results to read: the sink URI (postgresql://...?table=T, sqlite:///db?table=T, a Parquet "
                   "directory or s3:// prefix).")
@click.option("--threshold", type=float, default=None,
              help="Decision threshold for agreement [default: SCORING_ROUTING__THRESHOLD, 0.5].")
@click.option("--since", default=None, help=SINCE_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@setting("--s3-endpoint-url", "s3.endpoint_url")
@with_settings
def compare_cmd(settings: Settings, results: str, threshold: float | None, since: str | None,
                as_json: bool) -> None:
    """Compare model versions from a results table: rows, score distribution, shadow agreement."""
    from workers.tools.compare import compare, read_results, render_text

    table = read_results(results, settings.s3, _since(since))
    report = compare(table, settings.routing.threshold if threshold is None else threshold)
    click.echo(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() if as_json else render_text(report))


@cli.command("report")
@model_options
@setting("--routing", "routing.path")
@setting("--id-column", "scoring.id_column")
@s3_options
@click.option("--results", required=True, help="Results to read: the sink URI (as for `compare`).")
@click.option("--output", "out", required=True, help="File to write: .html (the page) or .svg (its charts).")
@click.option("--threshold", type=float, default=None,
              help="Decision threshold [default: SCORING_ROUTING__THRESHOLD, 0.5].")
@click.option("--since", default=None, help=SINCE_HELP)
@click.option("--profile", "profile_path", default=None, help="Reference profile (from `profile`) for drift.")
@click.option("--data", default=None, help="The scored inputs (Parquet) to measure drift on, with --profile.")
@with_settings
def report_cmd(settings: Settings, results: str, out: str, threshold: float | None, since: str | None,
               profile_path: str | None, data: str | None) -> None:
    """Write a report page: score distributions per version, shadow agreement, drift per feature.

    The model (--model or --routing) is needed only for drift (--profile with --data).
    """
    from workers.tools import report as rep
    from workers.tools.compare import compare, read_results

    if bool(profile_path) != bool(data):
        raise ConfigError("--profile" if data else "--data", "--profile and --data go together")
    _output_file(out)
    table = read_results(results, settings.s3, _since(since))
    summary = compare(table, settings.routing.threshold if threshold is None else threshold)
    drift = _as_data(lambda: rep.drift_of(settings, data, profile_path)) if profile_path and data else None
    text = rep.picture(summary, drift) if out.endswith(".svg") else rep.page(summary, drift, redact(results))
    _write(out, text)
    click.echo(f"wrote {out}: {summary['rows']:,} rows, {len(summary['versions'])} version(s)"
               f"{f', drift for {len(drift)} features' if drift else ''}")


@cli.command("settings")
@click.option("--env", "as_env", is_flag=True,
              help="Print the settings given by flags and SCORING_* variables as KEY=VALUE lines (secrets left "
                   "out): paste them into deploy/<mode>/*.env, the ConfigMap the workers and KEDA both read.")
@common
@kafka_options
@with_settings
def settings_reference(settings: Settings, as_env: bool) -> None:
    """Print every setting as a Markdown table (env var, default, meaning): the README's reference."""
    from workers.settings import env_lines, reference_rows

    if as_env:
        lines = env_lines(settings)
        for line in lines:
            click.echo(line)
        if any(":***@" in line or "=***" in line.split("=", 1)[1] for line in lines):
            click.echo("note: passwords inside URIs are shown as ***: keep the real URI in a Secret, not in the "
                       "ConfigMap", err=True)
        return
    click.echo("| env var | default | meaning |\n|---|---|---|")
    for name, default, text in reference_rows():
        click.echo(f"| `{name}` | {f'`{default}`' if default else ''} | {text.replace('|', '/')} |")


def _friendly(exc: BaseException) -> str:
    """One line (a driver's multi-line message folded), naming the setting and its flag."""
    if isinstance(exc, ConfigError):
        parts = tuple(p.lower() for p in exc.setting.removeprefix("SCORING_").split("__"))
        flag = FLAGS.get(parts)
        text = f"error: {exc.setting}{f' ({flag})' if flag else ''}: {str(exc).split(': ', 1)[1]}"
    else:
        text = f"error: {exc}"
    return " ".join(text.split())


def main() -> None:
    try:
        cli.main(prog_name="scoring-worker", standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.UsageError as exc:  # one line, like every other mistake (click's own takes three)
        message = " ".join(exc.format_message().split())
        where = exc.ctx.command_path if exc.ctx else "scoring-worker"
        click.echo(f"error: {message} (see '{where} --help')", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        click.echo(f"error: {' '.join(exc.format_message().split())}", err=True)
        sys.exit(exc.exit_code)
    except ConfigError as exc:
        click.echo(_friendly(exc), err=True)
        sys.exit(2)
    except ScoringError as exc:
        click.echo(_friendly(exc), err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    except SystemExit:
        raise
    except Exception:
        logging.getLogger("workers").exception("unexpected error")
        sys.exit(1)
