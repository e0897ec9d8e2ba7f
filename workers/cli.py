"""The command line: ``scoring-worker batch | stream | serve`` (the modes) and the tools beside them (``check``,
``produce``, ``compile``, ``profile``, ``schema``, ``compare``, ``report``, ``demo``, ``settings``); ``--help``
lists the two groups apart.

This module only declares: each command's options, then one call into the module that does the work
(workers/runtime/ for the modes and ``check``, workers/tools/ for the tools), which returns the exit code.
Each flag bound to a setting is generated from the settings field (workers/cli_options.py), so its help is the
field's docstring and names the env var; a flag given on the command line overrides the env var. A user
mistake ends with one line on stderr naming the setting or option and exit code 2 (a wrong setting or usage)
or 1 (failed inputs, an unreachable service, a failed check), never a traceback (``main`` below turns the
errors into that line); tests/test_user_mistakes.py holds that.

Trap: the work modules are imported inside the commands, so ``--help`` and a mistyped option stay fast and
do not load LightGBM, Arrow or librdkafka.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

import click

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
from workers.settings import Settings

MODES = ("batch", "stream", "serve")


class _Sections(click.Group):
    """``--help`` lists the modes (what a deployment runs) apart from the tools (what a person runs beside
    them); command names stay flat (``scoring-worker produce``). Modes in MODES' order, tools by name."""

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        found = [(name, self.get_command(ctx, name)) for name in self.list_commands(ctx)]
        commands = [(name, cmd) for name, cmd in found if cmd is not None and not cmd.hidden]
        if not commands:
            return
        width = formatter.width - 6 - max(len(name) for name, _ in commands)
        modes = sorted((c for c in commands if c[0] in MODES), key=lambda c: MODES.index(c[0]))
        tools = [c for c in commands if c[0] not in MODES]
        for title, rows in (("Modes", modes), ("Tools", tools)):
            if rows:
                with formatter.section(title):
                    formatter.write_dl([(name, cmd.get_short_help_str(width)) for name, cmd in rows])


@click.group(cls=_Sections, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="scoring-worker")
def cli() -> None:
    """Score records with a LightGBM model: Parquet files (batch), Kafka topics (stream), HTTP (serve).

    Every option is also an env var (shown in brackets); S3 keys come only from env vars
    (SCORING_S3__ACCESS_KEY_ID, SCORING_S3__SECRET_ACCESS_KEY) or the AWS credential chain.

    Exit codes: 0 done; 1 failed inputs, an unreachable service or a failed check; 2 a wrong setting or usage
    (one line naming it).
    """


# ---- modes -----------------------------------------------------------------------------------------------


@cli.command()
@common
@setting("--input", "batch.input")
@setting("--output", "batch.output")
@setting("--batch-rows", "batch.batch_rows")
@setting("--shard-index", "batch.shard_index")
@setting("--shard-count", "batch.shard_count")
@setting("--unit-bytes", "batch.unit_bytes")
@setting("--allow-bad-rows", "batch.allow_bad_rows", is_flag=True)
@setting("--progress", "batch.progress")
@setting("--queue-topic", "batch.queue_topic")
@setting("--queue-group", "batch.queue_group")
@setting("--idle-exit-s", "batch.idle_exit_s")
@setting("--bootstrap-servers", "kafka.bootstrap_servers")
@with_settings
def batch(settings: Settings) -> None:
    """Score Parquet files into a Parquet dataset, PostgreSQL, MariaDB, SQLite, Redis or Delta Lake. Reruns resume.

    With --queue-topic, the files come from "file arrived" events on a Kafka topic instead of --input,
    and the run ends when the topic is drained (for a KEDA ScaledJob).
    """
    from workers.runtime.batch import batch_command

    sys.exit(_traced("batch", batch_command, settings))


@cli.command()
@common
@kafka_options
@with_settings
def stream(settings: Settings) -> None:
    """Consume records from Kafka (JSON, or Avro/Protobuf/JSON Schema with --value-format), score micro-batches,
    store results, then commit offsets.

    The SASL password comes only from SCORING_KAFKA__SASL_PASSWORD (never a flag, never logged).
    """
    from workers.runtime.stream.worker import run_stream

    sys.exit(_traced("stream", run_stream, settings))


@cli.command()
@common
@setting("--host", "serve.host")
@setting("--port", "serve.port", aliases=("--http_port",))
@setting("--grpc-port", "serve.grpc_port", aliases=("--grpc_port",))
@setting("--model-name", "serve.model_name", aliases=("--model_name",))
@setting("--max-batch-rows", "serve.max_batch_rows")
@setting("--max-latency-ms", "serve.max_latency_ms")
@setting("--max-body-bytes", "serve.max_body_bytes")
@setting("--reply-type", "serve.reply_type")
@setting("--sink", "serve.sink")
@with_settings
def serve(settings: Settings) -> None:
    """HTTP for Knative and KServe: the Open Inference Protocol v2 (REST, and gRPC on --grpc-port) and
    CloudEvents (KafkaSource).

    As a KServe runtime: --model-dir /mnt/models (where the storage initializer puts storageUri) and
    --model-name {{.Name}}; KServe's spellings (--model_dir, --model_name, --http_port, --grpc_port)
    are accepted too.
    """
    from workers.runtime.serve.app import run_serve
    from workers.runtime.serve.bind import port_free

    sv = settings.serve
    port_free(sv.host, sv.port, "SCORING_SERVE__PORT")
    if sv.grpc_port is not None:
        if sv.grpc_port == sv.port and sv.port != 0:
            raise ConfigError("SCORING_SERVE__GRPC_PORT", f"{sv.grpc_port} is the HTTP port too; choose another")
        port_free(sv.host, sv.grpc_port, "SCORING_SERVE__GRPC_PORT")
    sys.exit(_traced("serve", run_serve, settings))


# ---- tools -----------------------------------------------------------------------------------------------


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
    """Publish Parquet rows as JSON records (a tool for trying stream mode; not used in production).

    TLS and SASL come from the SCORING_KAFKA__* env vars, as for the worker.
    """
    from workers.settings import load_settings
    from workers.tools.produce import produce

    setup_logging("WARNING")
    kafka = load_settings({"kafka": {"bootstrap_servers": bootstrap_servers}}).kafka
    produce(kafka, topic, source, partitions, bad, limit, id_column)


@cli.command("compile")
@model_options
@setting("--routing", "routing.path")
@s3_options
@with_settings
def compile_cmd(settings: Settings) -> None:
    """Compile the model (with --routing: every version's) with lleaves into the cache (e.g. in an init
    container or at image build)."""
    from workers.tools.compile import compile_models

    sys.exit(compile_models(settings))


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
    from workers.tools.profile import write_profile

    write_profile(settings, data, out, bins, max_rows)


@cli.command("schema")
@model_options
@setting("--id-column", "scoring.id_column")
@setting("--passthrough", "scoring.passthrough")
@s3_options
@setting("--schema-registry-url", "schema_registry.url")
@setting("--schema-registry-username", "schema_registry.username")
@setting("--schema-registry-ca-file", "schema_registry.ca_file")
@click.option("--check", "producer", default=None,
              help="A producer's JSON Schema file to check against the model instead, or registry:SUBJECT[/VERSION] "
                   "(that subject's latest or given version from the Schema Registry: Avro, Protobuf or JSON Schema): "
                   "one line per mismatch, exit 1 when records shaped like it would be rejected.")
@click.option("--format", "fmt", type=click.Choice(["jsonschema", "avro", "protobuf"]), default="jsonschema",
              show_default=True, help="The form of the printed contract: JSON Schema, an Avro record, a .proto.")
@with_settings
def schema_cmd(settings: Settings, producer: str | None, fmt: str) -> None:
    """Print the input contract of the model (id, features and types, categories, nulls) as JSON Schema, Avro or
    Protobuf."""
    from workers.tools.schema import run_schema

    sys.exit(run_schema(settings, producer, fmt))


SINCE_HELP = ("Only rows scored at or after this time: ISO 8601 (2026-11-25T10:00, UTC unless it has an offset) "
              "or a duration ago (30m, 2h, 7d).")


@cli.command("compare")
@click.option("--results", required=True,
              help="Results to read: the sink URI (postgresql://...?table=T, mysql://...?table=T, "
                   "sqlite:///db?table=T, redis://host:port/db?prefix=P, delta+file:///path or delta+s3://bucket/path, "
                   "a Parquet directory or s3:// prefix).")
@click.option("--threshold", type=float, default=None,
              help="Decision threshold for agreement [default: SCORING_ROUTING__THRESHOLD, 0.5].")
@click.option("--since", default=None, help=SINCE_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@setting("--s3-endpoint-url", "s3.endpoint_url")
@with_settings
def compare_cmd(settings: Settings, results: str, threshold: float | None, since: str | None,
                as_json: bool) -> None:
    """Compare model versions from a results table: rows, score distribution, shadow agreement."""
    from workers.tools.compare import run_compare

    run_compare(settings, results, threshold, since, as_json)


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
    from workers.tools.report import write_report

    write_report(settings, results, out, threshold, since, profile_path, data)


@cli.command("settings")
@click.option("--env", "as_env", is_flag=True,
              help="Print the settings given by flags and SCORING_* variables as KEY=VALUE lines (secrets left "
                   "out): paste them into deploy/<mode>/*.env, the ConfigMap the workers and KEDA both read.")
@common
@kafka_options
@with_settings
def settings_reference(settings: Settings, as_env: bool) -> None:
    """Print every setting as a Markdown table (env var, default, meaning): the README's reference."""
    from workers.tools.reference import print_settings

    print_settings(settings, as_env)


def _traced(mode: str, run: Callable[[Settings], int], settings: Settings) -> int:
    """Run a mode with traces when the ``OTEL_*`` variables ask for them (workers/tracing.py); what is still
    buffered is exported before the process exits."""
    from workers import tracing

    tracing.setup(mode)  # ConfigError (exit 2) for a refused OTEL_* value or missing packages
    try:
        return run(settings)
    finally:
        tracing.shutdown()


def _friendly(exc: BaseException) -> str:
    """One line (a driver's multi-line message folded), naming the setting and its flag."""
    if isinstance(exc, ConfigError):
        parts = tuple(p.lower() for p in exc.setting.removeprefix("SCORING_").split("__"))
        flag = FLAGS.get(parts)
        text = f"error: {exc.setting}{f' ({flag})' if flag else ''}: {exc.reason}"
    else:
        text = f"error: {exc}"
    return " ".join(text.split())


def _group_writable_under_gid0() -> None:
    """OpenShift (restricted-v2) runs the container as an arbitrary UID in group 0; pods of other UIDs share a
    volume (a model cache, an output folder) only through that group, so what this process writes must be
    group-writable: the group bits leave the umask. Any other user keeps the umask it has."""
    import os

    if os.getgid() == 0 and os.getuid() != 0:
        old = os.umask(0)
        os.umask(old & ~0o070)


def main() -> None:
    _group_writable_under_gid0()
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
