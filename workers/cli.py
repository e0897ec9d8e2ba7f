"""The command line: ``scoring-worker batch | stream | check | demo``.

Each flag is generated from a settings field, so its help is the field's docstring and names the env
var; a flag given on the command line overrides the env var. User mistakes end with one line on
stderr and exit code 2 (settings) or 1 (failed inputs), never a traceback.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import Any

import click
import orjson

from workers import __version__
from workers.errors import ConfigError, ScoringError
from workers.logs import setup_logging
from workers.settings import Settings, env_name, field_for, load_settings

FLAGS: dict[tuple[str, ...], str] = {}


def setting(flag: str, path: str, *, is_flag: bool = False, multiple: bool = False) -> Callable:
    """A click option bound to the setting at dotted ``path`` (e.g. 'model.path')."""
    parts = tuple(path.split("."))
    info = field_for(parts)
    FLAGS[parts] = flag.split("/")[0]
    text = " ".join((info.description or "").split())
    dest = "__".join(parts)
    kwargs: dict[str, Any] = {"default": None, "help": f"{text} [env: {env_name(parts)}]"}
    if is_flag:
        flag = f"{flag}/--no-{flag[2:]}"
    if multiple:
        kwargs["multiple"] = True
    return click.option(flag, dest, **kwargs)


def _overrides(params: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dest, value in params.items():
        if value is None or value == () or "__" not in dest and dest not in Settings.model_fields:
            continue
        parts = dest.split("__")
        if isinstance(value, tuple):  # a repeated flag (--topic a --topic b), each may hold a,b
            value = [v.strip() for item in value for v in item.split(",") if v.strip()]
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def options(*opts: Callable) -> Callable:
    """One decorator applying several options, listed in the order ``--help`` shows them."""

    def apply(fn: Callable) -> Callable:
        for opt in reversed(opts):
            fn = opt(fn)
        return fn

    return apply


def with_settings(fn: Callable) -> Callable:
    """Turn the command's setting flags into a validated Settings passed as ``settings``."""

    @functools.wraps(fn)
    def wrapper(**params: Any) -> Any:
        own = {k: v for k, v in params.items() if "__" not in k and k not in Settings.model_fields}
        settings = load_settings(_overrides(params))
        setup_logging(settings.log_level)
        return fn(settings=settings, **own)

    return wrapper


common = options(
    setting("--model", "model.path"),
    setting("--routing", "routing.path"),
    setting("--routing-poll-s", "routing.poll_s"),
    setting("--shadow-sink", "routing.shadow_sink"),
    setting("--model-sha256", "model.sha256"),
    setting("--model-version", "model.version"),
    setting("--threads", "model.threads"),
    setting("--backend", "model.backend"),
    setting("--cache-dir", "model.cache_dir"),
    setting("--id-column", "scoring.id_column"),
    setting("--passthrough", "scoring.passthrough"),
    setting("--explain", "scoring.explain"),
    setting("--explain-top-k", "scoring.explain_top_k"),
    setting("--s3-endpoint-url", "s3.endpoint_url"),
    setting("--s3-region", "s3.region"),
    setting("--log-level", "log_level"),
)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="scoring-worker")
def cli() -> None:
    """Score records with a LightGBM model: Parquet files (batch), Kafka topics (stream), HTTP (serve).

    Every option is also an env var (shown in brackets); S3 keys come only from env vars
    (SCORING_S3__ACCESS_KEY_ID, SCORING_S3__SECRET_ACCESS_KEY) or the AWS credential chain.
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
    if report.failed:
        summary["failures"] = [{"input": rel, "reason": reason} for rel, reason in report.failed]
    click.echo(orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode())
    for rel, reason in report.failed:
        click.echo(f"failed: {rel}: {reason}", err=True)
    if report.rejected and not report.allow_bad_rows:
        click.echo(f"rejected {report.rejected} rows: see the errors output (or pass --allow-bad-rows)", err=True)
    sys.exit(report.exit_code)


kafka_options = options(
    setting("--bootstrap-servers", "kafka.bootstrap_servers"),
    setting("--security-protocol", "kafka.security_protocol"),
    setting("--sasl-mechanism", "kafka.sasl_mechanism"),
    setting("--sasl-username", "kafka.sasl_username"),
    setting("--ssl-cafile", "kafka.ssl_cafile"),
    setting("--topic", "stream.topics", multiple=True),
    setting("--group", "stream.group"),
    setting("--sink", "stream.sink"),
    setting("--dead-letter-topic", "stream.dead_letter_topic"),
    setting("--on-bad-record", "stream.on_bad_record"),
    setting("--key-as-id", "stream.key_as_id", is_flag=True),
    setting("--max-records", "stream.max_records"),
    setting("--max-wait-ms", "stream.max_wait_ms"),
    setting("--auto-offset-reset", "stream.auto_offset_reset"),
    setting("--session-timeout-ms", "stream.session_timeout_ms"),
    setting("--heartbeat-interval-ms", "stream.heartbeat_interval_ms"),
    setting("--max-poll-interval-ms", "stream.max_poll_interval_ms"),
    setting("--fetch-max-bytes", "stream.fetch_max_bytes"),
    setting("--max-partition-fetch-bytes", "stream.max_partition_fetch_bytes"),
    setting("--shutdown-timeout-s", "stream.shutdown_timeout_s"),
    setting("--stall-seconds", "stream.stall_seconds"),
    setting("--metrics-port", "stream.metrics_port"),
)


@cli.command()
@common
@kafka_options
@with_settings
def stream(settings: Settings) -> None:
    """Consume JSON records from Kafka, score micro-batches, store results, then commit offsets.

    The SASL password comes only from SCORING_KAFKA__SASL_PASSWORD (never a flag, never logged).
    """
    from workers.runtime.stream import run_stream

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
    from workers.runtime.serve import run_serve

    sys.exit(run_serve(settings))


@cli.command()
@common
@kafka_options
@with_settings
def check(settings: Settings) -> None:
    """Load the settings and the model, reach the broker and the sink: one line per check, exit 0 or 1."""
    from workers.runtime.check import run_checks

    sys.exit(run_checks(settings))


@cli.command()
@click.option("--dir", "folder", default="scoring-demo", show_default=True, help="Folder the demo writes into.")
@click.option("--rows", default=200_000, show_default=True, help="Rows of generated input data.")
def demo(folder: str, rows: int) -> None:
    """Train a small model on generated data, write Parquet inputs, score them, report where and how fast."""
    from workers.demo import run_demo

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
    from workers.devtools import produce

    setup_logging("WARNING")
    produce(bootstrap_servers, topic, source, partitions, bad, limit, id_column)


@cli.command("compile")
@common
@with_settings
def compile_cmd(settings: Settings) -> None:
    """Compile the model with lleaves into the cache (e.g. in an init container or at image build)."""
    from workers.model import load_model

    model = load_model(settings.model.model_copy(update={"backend": "lleaves"}), settings.s3)
    if model.backend != "lleaves":
        click.echo("error: could not compile the model with lleaves (see the warning above)", err=True)
        sys.exit(1)
    click.echo(f"compiled {model.source} ({model.version}) into {settings.model.cache_dir}")


@cli.command("profile")
@common
@click.option("--data", required=True, help="Reference Parquet data (file, folder or glob), e.g. the training set.")
@click.option("--output", "out", required=True, help="Where to write the profile JSON.")
@click.option("--bins", default=10, show_default=True, help="Quantile bins per numeric feature.")
@click.option("--max-rows", default=1_000_000, show_default=True, help="Rows sampled from the data at most.")
@with_settings
def profile_cmd(settings: Settings, data: str, out: str, bins: int, max_rows: int) -> None:
    """Compute a reference profile (per-feature bins, shares, null share, min/max) for drift metrics."""
    import numpy as np

    from workers.drift import build_profile, feature_batches
    from workers.model import load_model
    from workers.scoring import Scorer

    model = load_model(settings.model, settings.s3)
    n_files, batches = feature_batches(Scorer(model, settings.scoring.id_column), data, settings.s3)
    parts, rows = [], 0
    for matrix in batches:
        parts.append(matrix)
        rows += matrix.shape[0]
        if rows >= max_rows:
            break
    profile = build_profile(model, np.concatenate(parts)[:max_rows] if parts else np.empty((0, 0)), bins)
    with open(out, "w") as fh:
        fh.write(orjson.dumps(profile, option=orjson.OPT_INDENT_2).decode())
    click.echo(f"profiled {min(rows, max_rows):,} rows of {n_files} file(s) into {out}")


@cli.command("schema")
@common
@click.option("--check", "producer", default=None,
              help="A producer's JSON Schema to check against the model instead: one line per mismatch, exit 1 "
                   "when records shaped like it would be rejected.")
@with_settings
def schema_cmd(settings: Settings, producer: str | None) -> None:
    """Print a JSON Schema for input records of the model (id, features and types, categories, nulls)."""
    from workers.model import load_model
    from workers.schema import check_producer, input_schema

    model = load_model(settings.model, settings.s3)
    if producer:
        try:
            with open(producer, "rb") as fh:
                theirs = orjson.loads(fh.read())
        except (OSError, orjson.JSONDecodeError) as exc:
            raise ConfigError("--check", f"cannot read {producer} as JSON: {exc}") from None
        errors, warnings = check_producer(theirs, model, settings.scoring.id_column)
        for line in errors:
            click.echo(f"error: {line}")
        for line in warnings:
            click.echo(f"warning: {line}")
        click.echo(f"{producer}: {len(errors)} error(s), {len(warnings)} warning(s) against {model.version}")
        sys.exit(1 if errors else 0)
    schema = input_schema(model, settings.scoring.id_column, settings.scoring.passthrough)
    click.echo(orjson.dumps(schema, option=orjson.OPT_INDENT_2).decode())


@cli.command("compare")
@click.option("--results", required=True,
              help="Results to read: the sink URI (postgresql://...?table=T, sqlite:///db?table=T, a Parquet "
                   "directory or s3:// prefix).")
@click.option("--threshold", type=float, default=None,
              help="Decision threshold for agreement [default: SCORING_ROUTING__THRESHOLD, 0.5].")
@click.option("--since", default=None, help="Only rows scored at or after this ISO time (e.g. 2026-11-25T10:00).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@click.option("--s3-endpoint-url", "s3__endpoint_url", default=None, help="S3 endpoint for s3:// results.")
@with_settings
def compare_cmd(settings: Settings, results: str, threshold: float | None, since: str | None,
                as_json: bool) -> None:
    """Compare model versions from a results table: rows, score distribution, shadow agreement."""
    from workers.rollout.compare import compare, read_results, render_text

    table = read_results(results, settings.s3, since)
    report = compare(table, settings.routing.threshold if threshold is None else threshold)
    click.echo(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() if as_json else render_text(report))


@cli.command("report")
@common
@click.option("--results", required=True, help="Results to read: the sink URI (as for `compare`).")
@click.option("--output", "out", required=True, help="File to write: .html (the page) or .svg (its charts).")
@click.option("--threshold", type=float, default=None,
              help="Decision threshold [default: SCORING_ROUTING__THRESHOLD, 0.5].")
@click.option("--since", default=None, help="Only rows scored at or after this ISO time.")
@click.option("--profile", "profile_path", default=None, help="Reference profile (from `profile`) for drift.")
@click.option("--data", default=None, help="The scored inputs (Parquet) to measure drift on, with --profile.")
@with_settings
def report_cmd(settings: Settings, results: str, out: str, threshold: float | None, since: str | None,
               profile_path: str | None, data: str | None) -> None:
    """Write a report page: score distributions per version, shadow agreement, drift per feature."""
    from workers import report as rep
    from workers.rollout.compare import compare, read_results

    if bool(profile_path) != bool(data):
        raise ConfigError("--profile" if data else "--data", "--profile and --data go together")
    table = read_results(results, settings.s3, since)
    summary = compare(table, settings.routing.threshold if threshold is None else threshold)
    drift = rep.drift_of(settings, data, profile_path) if profile_path and data else None
    text = rep.picture(summary, drift) if out.endswith(".svg") else rep.page(summary, drift, results)
    with open(out, "w") as fh:
        fh.write(text)
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
        for line in env_lines(settings):
            click.echo(line)
        return
    click.echo("| env var | default | meaning |\n|---|---|---|")
    for name, default, text in reference_rows():
        click.echo(f"| `{name}` | {f'`{default}`' if default else ''} | {text.replace('|', '/')} |")


def _friendly(exc: BaseException) -> str:
    if isinstance(exc, ConfigError):
        parts = tuple(p.lower() for p in exc.setting.removeprefix("SCORING_").split("__"))
        flag = FLAGS.get(parts)
        return f"error: {exc.setting}{f' ({flag})' if flag else ''}: {str(exc).split(': ', 1)[1]}"
    return f"error: {exc}"


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
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
