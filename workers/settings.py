"""Settings: one group per component, read from ``SCORING_<GROUP>__<NAME>`` env vars and CLI flags.

Every field's docstring is its reference text: ``--help`` and the README table come from it.

Why one module over ~400 lines: it is declarations (each field with its docstring), and one place for every
setting is what lets ``scoring-worker settings``, ``--help`` and the README table list them all, in one order,
from one source; the little logic here (URI redaction, the env/flag loader) serves those declarations.
"""

from __future__ import annotations

import json
import os
import re
import types
import typing
from typing import Annotated, Any, Literal
from urllib.parse import parse_qsl, unquote, urlencode

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError

from workers.errors import ConfigError

ENV_PREFIX = "SCORING_"
_GROUP_CONFIG = ConfigDict(use_attribute_docstrings=True, extra="forbid")
# Query parameters of a URI that hold secrets (libpq's password, sslpassword; S3-style keys).
# A query parameter whose name holds one of these is a secret (password, sslpassword, aws_secret_access_key, ...).
_SECRET_WORDS = ("password", "secret", "token", "access_key")


def _secret(name: str) -> bool:
    return any(w in name.lower() for w in _SECRET_WORDS)


def redact(uri: str) -> str:
    """``uri`` with the password of its userinfo and any secret query parameter replaced by ``***``.

    For everything printed or logged (summaries, ``settings --env``, check lines, errors). Only those parts
    are rewritten; the rest keeps its exact spelling (``sqlite:///x.db`` stays so). Text that is not a URI
    is returned unchanged.
    """
    if not isinstance(uri, str) or "://" not in uri:
        return uri
    scheme, rest = uri.split("://", 1)
    # The userinfo ends at the last @ before the first / that follows an @: a password may hold a raw
    # / ? # or @ (users paste them unencoded), a query may hold an @ of its own after the path.
    first = rest.find("@")
    slash = rest.find("/", first + 1) if first >= 0 else -1
    at = (rest.rfind("@", 0, slash) if slash >= 0 else rest.rfind("@")) + 1
    if at and ":" not in rest[:at] and "/" in rest[:at]:
        at = 0  # an @ in the path or query, no userinfo
    cut = min((i for i in (rest.find("/", at), rest.find("?", at), rest.find("#", at)) if i >= 0), default=len(rest))
    netloc, tail = rest[:cut], rest[cut:]
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        if ":" in userinfo:
            netloc = userinfo.split(":", 1)[0] + ":***@" + host
    if "?" in tail:
        path, query = tail.split("?", 1)
        query, hash_, fragment = query.partition("#")
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(_secret(k) for k, _ in pairs):
            query = urlencode([(k, "***" if _secret(k) else v) for k, v in pairs], safe="*/")
        tail = f"{path}?{query}{hash_}{fragment}"
    return f"{scheme}://{netloc}{tail}"


def scrub(text: str, uri: str) -> str:
    """``text`` (a driver's error message) without the secrets of ``uri``: drivers quote what they could not
    parse, a password included (psycopg: 'invalid percent-encoded token: "s3%cret"')."""
    secrets = set()
    shown = redact(uri)
    if shown != uri:
        # What redact replaced by *** is secret: recover each piece by aligning the two spellings.
        head, _, tail = shown.partition("***")
        while _:
            start = len(head)
            end = uri.find(tail.split("***", 1)[0], start) if tail.split("***", 1)[0] else len(uri)
            if end > start:
                secrets.add(uri[start:end])
                secrets.add(unquote(uri[start:end]))
            uri, shown = uri[end:], tail
            head, _, tail = shown.partition("***")
    for secret in sorted(secrets, key=len, reverse=True):
        if len(secret) >= 3:
            text = text.replace(secret, "***")
    return text


REGISTRY_SCHEMES = ("models:/", "runs:/")


def readable_uri(value: Any) -> Any:
    """A path, ``file://`` or ``s3://`` URI: the places models and Parquet inputs are read from (models also from
    the MLflow registry: ``models:/`` and ``runs:/``, checked in ``workers/scoring/registry.py``)."""
    if isinstance(value, str) and value.startswith(REGISTRY_SCHEMES):
        return value
    if isinstance(value, str) and "://" in value:
        scheme = value.split("://", 1)[0].lower()
        if scheme not in ("file", "s3"):
            raise ValueError(f"unknown scheme {scheme!r}; use a path, file:// or s3://")
    return value


ReadableUri = Annotated[str | None, AfterValidator(readable_uri)]


def _allows_none(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in typing.get_args(
        annotation)


class _Group(BaseModel):
    """A settings group. An empty value (``SCORING_X__Y=`` or ``--y ""``) of an optional setting means unset
    (None): "empty disables" as the docs say, and what a ConfigMap with a blank line gives."""

    model_config = _GROUP_CONFIG

    @model_validator(mode="before")
    @classmethod
    def _empty_is_none(cls, data: Any) -> Any:
        if isinstance(data, dict):
            fields = cls.model_fields
            return {k: None if v == "" and k in fields and _allows_none(fields[k].annotation) else v
                    for k, v in data.items()}
        return data


def _names(value: Any) -> Any:
    """A list from JSON (`["a","b"]`) or comma-separated text (`a,b`)."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [v.strip() for v in text.split(",") if v.strip()]
    return value


NameList = Annotated[list[str], NoDecode, BeforeValidator(_names)]

def _topic(value: str) -> str:
    # Kafka's own rule for topic names; a name it refuses would be retried forever at the first produce or fetch.
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,249}", value):
        raise ValueError("is not a Kafka topic name (1 to 249 letters, digits, '.', '_' or '-')")
    return value


def _text(value: str) -> str:
    # An empty group id aborts librdkafka (SIGABRT); an empty id field dead-letters every record.
    if not value.strip():
        raise ValueError("must not be empty")
    return value


TopicName = Annotated[str, AfterValidator(_topic)]
Text = Annotated[str, AfterValidator(_text)]


class ModelSettings(_Group):
    path: ReadableUri = None
    """LightGBM model file in the text format `Booster.save_model` writes: a path, `file://` or `s3://` URI, or
    from the MLflow registry `models:/NAME@ALIAS`, `models:/NAME/VERSION`, `runs:/RUN_ID/PATH` (see
    `SCORING_MLFLOW__*`)."""
    dir: str | None = None
    """Folder holding one model file, instead of a model path (not both): e.g. `/mnt/models`, where KServe's
    storage initializer puts an InferenceService's `storageUri`. The file is its only `*.txt`, `*.bst`, `*.lgb` or
    `*.model` file (sub-folders searched), else its only file; several candidates stop start-up."""
    sha256: str | None = None
    """Pinned SHA-256 (hex) of the model file; when set, a file with another hash is refused before parsing."""
    version: str | None = None
    """Model version written with every result; default: the file stem plus the first 12 hex digits of its SHA-256
    (`NAME/VERSION` for a `models:/` URI, `RUN_ID/PATH` for a `runs:/` one)."""
    threads: int = Field(1, ge=1, le=256)
    """Threads LightGBM uses per predict call. Keep 1 and scale with processes/pods."""
    backend: Literal["lightgbm", "lleaves"] = "lightgbm"
    """Predict backend: `lightgbm`, or `lleaves` (the model compiled to native code, about 5x faster; checked
    against LightGBM on load and replaced by it, with a warning, if it cannot compile or differs)."""
    cache_dir: str = "/tmp/scoring-cache"  # noqa: S108 - a cache, and /tmp is the writable mount in the image
    """Where compiled models (and the record of model files that passed the load check) are cached by SHA-256
    (share it between pods, or precompile with `compile`)."""

    @model_validator(mode="after")
    def _one_source(self) -> ModelSettings:
        # Both given is ambiguous (an image's env naming one model, a KServe runtime's --model-dir another):
        # refuse rather than pick one silently.
        if self.path and self.dir:
            raise ValueError("set either SCORING_MODEL__PATH (--model) or SCORING_MODEL__DIR (--model-dir), not both")
        return self


class S3Settings(_Group):
    endpoint_url: str | None = None
    """S3 endpoint, e.g. `http://127.0.0.1:9000` for MinIO or moto; empty means AWS."""
    access_key_id: str | None = None
    """S3 access key id; empty means the AWS default credential chain."""
    secret_access_key: SecretStr | None = None
    """S3 secret access key (never logged)."""
    region: str = "us-east-1"
    """S3 region."""


class IcebergSettings(_Group):
    catalog_uri: str | None = None
    """SQL catalog of `iceberg://CATALOG/namespace.table` outputs (pyiceberg's SqlCatalog; CATALOG is its catalog
    name): a SQLAlchemy URL, `postgresql://user:pass@host:5432/db` (driven by psycopg 3) or
    `sqlite:////abs/path/catalog.db`. Its password is never printed."""
    warehouse: str | None = None
    """Where new Iceberg tables are created: `file:///abs/path` or `s3://bucket/prefix` (S3 with the
    `SCORING_S3__*` settings); a table goes to `WAREHOUSE/namespace/table`."""


def _http_url(value: Any) -> Any:
    if isinstance(value, str) and not value.lower().startswith(("http://", "https://")):
        raise ValueError("must be the http:// or https:// URL of an MLflow server")
    return value


class MlflowSettings(_Group):
    tracking_uri: Annotated[str | None, AfterValidator(_http_url)] = None
    """MLflow tracking server (`http://host:5000`) that `models:/` and `runs:/` model URIs are resolved with
    (registry REST API; artifacts through its proxy `mlflow-artifacts:/`, `s3://` or a local path)."""
    token: SecretStr | None = None
    """Bearer token sent to the MLflow server (never logged)."""
    username: str | None = None
    """User name for HTTP basic auth to the MLflow server (with `SCORING_MLFLOW__PASSWORD`)."""
    password: SecretStr | None = None
    """Password for HTTP basic auth to the MLflow server (never logged)."""
    poll_s: float = Field(30.0, ge=0)
    """How often a `models:/NAME@ALIAS` model is resolved again (stream, serve); a batch is scored by the version
    the alias named at the latest resolve before it began (0: resolve at start-up only; SIGHUP still does)."""
    switch_wait_s: float = Field(30.0, ge=0, le=600)
    """How long a batch (serve: a request) waits for the version a moved alias names to load and verify, instead
    of starting on the old one; past it, or when the load fails, the old version scores it."""
    retry_s: float = Field(5.0, gt=0, le=3600)
    """First retry delay of a failed load of the version a followed alias names (doubles on each failure)."""
    retry_max_s: float = Field(300.0, gt=0, le=86400)
    """Longest delay between retries of a failed load of a followed alias's version."""
    timeout_s: float = Field(10.0, gt=0, le=600)
    """Timeout of one HTTP request to the MLflow server (registry call or artifact download)."""

    @model_validator(mode="after")
    def _check_auth(self) -> MlflowSettings:
        if self.token and self.username:
            raise ValueError("set either SCORING_MLFLOW__TOKEN or SCORING_MLFLOW__USERNAME/PASSWORD, not both")
        if bool(self.username) != bool(self.password):
            raise ValueError("basic auth needs both SCORING_MLFLOW__USERNAME and SCORING_MLFLOW__PASSWORD")
        return self


class ScoringSettings(_Group):
    id_column: Text = "id"
    """Input column (batch) or JSON field (stream) holding the record id; with the model version it keys each result."""
    passthrough: NameList = Field(default_factory=list)
    """Input columns copied unchanged into each result (comma-separated on the command line)."""
    explain: Literal["none", "top", "all"] = "none"
    """Per-record feature contributions (TreeSHAP, LightGBM `pred_contrib`) in an `explanation` column: the top
    `explain_top_k` features by absolute contribution, or all of them; `explanation_base` holds the expected value."""
    explain_top_k: int = Field(5, ge=1, le=1000)
    """How many features `explain=top` keeps per record."""
    profile: str | None = None
    """Reference profile (from `scoring-worker profile`): stream mode then exports drift per feature (PSI, null
    share, share outside the reference range) over the last `drift_window` records."""
    drift_window: int = Field(50_000, ge=100)
    """Records in the sliding window drift is computed over."""


class BatchSettings(_Group):
    input: ReadableUri = None
    """Parquet input: a file, a directory, a glob (`data/*.parquet`) or an `s3://bucket/prefix`."""
    output: str | None = None
    """Where results go: a directory or `s3://` prefix (Parquet dataset, one file per input file) or
    `postgresql://user@host:port/db?table=NAME`, `mysql://user@host:3306/db?table=NAME` (MariaDB),
    `sqlite:///path.db?table=NAME`, `redis://host:port/db?prefix=scores:` (one hash per id), a Delta Lake table
    `delta+file:///abs/path` or `delta+s3://bucket/path`, or an Iceberg table `iceberg://CATALOG/namespace.table`
    (see `SCORING_ICEBERG__*`)."""
    batch_rows: int = Field(65536, ge=1, le=10_000_000)
    """Rows per scoring batch read from a Parquet file; peak memory is about one batch plus one row group."""
    shard_index: int | None = Field(None, ge=0)
    """This pod's shard (0-based). Default: `JOB_COMPLETION_INDEX` (Kubernetes Indexed Job), else 0."""
    shard_count: int = Field(1, ge=1)
    """Number of shards (the Indexed Job's completions). Every pod computes the same plan: each unit (a file, or
    a row-group range of a file larger than `unit_bytes`) belongs to exactly one shard, balanced by bytes."""
    unit_bytes: int = Field(256 * 2**20, ge=0)
    """Files larger than this are cut into ranges of row groups of about this many compressed bytes, each its
    own unit (shard, ledger entry, output file `NAME.row-groups-A-B-of-N.parquet`), so one big file spreads over
    many pods and a rerun resumes mid-file. 0: whole files only. Changing it rescores the large files once
    (their earlier results are replaced, not doubled)."""
    allow_bad_rows: bool = False
    """Exit 0 when the only failures were rejected rows (they are in the errors output either way)."""
    progress: Literal["auto", "bar", "log"] = "auto"
    """Progress display: a bar on a terminal, JSON log lines otherwise (`auto`)."""
    queue_topic: TopicName | None = None
    """Take the files to score from this Kafka topic of "file arrived" events (a path or URI as the value, or
    JSON with `path`/`uri`) instead of listing `input`; the run exits when the topic is drained (KEDA ScaledJob)."""
    queue_group: Text = "scoring-batch"
    """Consumer group of the queue topic; every Job of one ScaledJob uses the same group."""
    idle_exit_s: float = Field(10.0, gt=0)
    """With a queue topic: exit after this long with no new event (the queue is drained)."""


class KafkaSettings(_Group):
    bootstrap_servers: str = "127.0.0.1:9092"
    """Kafka bootstrap servers, comma-separated `host:port`."""
    client_id: str = "scoring-worker"
    """Client id sent to the broker (shows in broker logs and quotas)."""
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    """How to talk to the broker."""
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    """SASL mechanism when the protocol is SASL_*."""
    sasl_username: str | None = None
    """SASL username."""
    sasl_password: SecretStr | None = None
    """SASL password (never logged or shown)."""
    ssl_cafile: str | None = None
    """CA bundle (PEM) to verify the broker's certificate; empty means the system's CAs."""
    ssl_certfile: str | None = None
    """Client certificate (PEM) for brokers that demand one (mTLS); needs `ssl_keyfile`."""
    ssl_keyfile: str | None = None
    """Private key (PEM) of `ssl_certfile`."""
    ssl_key_password: SecretStr | None = None
    """Password of an encrypted `ssl_keyfile` (never logged or shown)."""
    ssl_check_hostname: bool = True
    """Check that the broker's certificate names the host connected to (false: any certificate the CA signed)."""

    def librdkafka_config(self) -> dict[str, Any]:
        """These settings as librdkafka properties: every Kafka client of the worker is confluent-kafka (the stream
        and batch-queue consumers, the producers, the produce tool, `check`).

        With TLS, the files are checked first (``workers.kafka_tls.check_files``): a missing or unreadable file, a
        key that does not match the certificate or a wrong key password raises ConfigError naming the setting,
        where librdkafka would say "ssl.key.location failed: PEM lib". Not at settings load: a deployment's
        files exist only inside its pod (tests/test_deploy.py loads those settings here)."""
        cfg: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap_servers,
            "client.id": self.client_id,
            "security.protocol": self.security_protocol,
        }
        if self.sasl_mechanism:
            cfg["sasl.mechanisms"] = self.sasl_mechanism
            cfg["sasl.username"] = self.sasl_username or ""
            cfg["sasl.password"] = self.sasl_password.get_secret_value() if self.sasl_password else ""
        if self.security_protocol.endswith("SSL"):
            from workers.kafka_tls import check_files

            check_files(self)
            if self.ssl_cafile:
                cfg["ssl.ca.location"] = self.ssl_cafile
            if self.ssl_certfile:
                cfg["ssl.certificate.location"] = self.ssl_certfile
                cfg["ssl.key.location"] = self.ssl_keyfile
            if self.ssl_key_password:
                cfg["ssl.key.password"] = self.ssl_key_password.get_secret_value()
            cfg["ssl.endpoint.identification.algorithm"] = "https" if self.ssl_check_hostname else "none"
        return cfg


class StreamSettings(_Group):
    topics: Annotated[list[TopicName], NoDecode, BeforeValidator(_names)] = Field(default_factory=list)
    """Topics to consume (repeat --topic, or comma-separated in the env var)."""
    group: Text = "scoring-workers"
    """Consumer group id; every pod of one deployment uses the same group."""
    sink: str = "sqlite:///scores.db?table=scores"
    """Where results go: `postgresql://...?table=T`, `mysql://...?table=T` (MariaDB), `sqlite:///path.db?table=T`,
    `redis://host:port/db?prefix=P`, `kafka://topic`, `delta+file:///path` or `delta+s3://bucket/path` (Delta
    Lake, one MERGE per batch), `iceberg://CATALOG/namespace.table` (one Iceberg commit per batch), a directory
    or `s3://` prefix (Parquet, one file per partition per committed batch)."""
    dead_letter_topic: TopicName | None = None
    """Topic for bad records (original key and value, headers with the reason); default `<topic>.dlq`."""
    on_bad_record: Literal["dead-letter", "fail"] = "dead-letter"
    """What a record that cannot be scored does: go to the dead-letter topic, or stop the worker (exit 1)."""
    key_as_id: bool = False
    """Use the message key as the record id when the JSON has no id field."""
    value_format: Literal["json", "avro", "protobuf", "jsonschema"] = "json"
    """Record values: plain JSON, or the Confluent wire format (magic byte 0, schema id, payload) of Avro,
    Protobuf or JSON Schema, with schemas from `SCORING_SCHEMA_REGISTRY__URL`."""
    max_records: int = Field(1000, ge=1, le=100_000)
    """Most records per micro-batch."""
    max_wait_ms: int = Field(200, ge=1, le=60_000)
    """Longest wait to fill a micro-batch before scoring what arrived."""
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    """Where a new group starts on a partition with no committed offset."""
    session_timeout_ms: int = Field(45_000, ge=1000)
    """Consumer group session timeout; a worker silent this long is removed from the group."""
    heartbeat_interval_ms: int = Field(3_000, ge=100)
    """Heartbeat interval (well below the session timeout)."""
    max_poll_interval_ms: int = Field(300_000, ge=1000)
    """Longest time between polls before the group evicts the worker; batch size adapts to stay well below."""
    assignment_strategy: Literal["cooperative-sticky", "range", "roundrobin"] = "cooperative-sticky"
    """Partition assignment (`partition.assignment.strategy`): `cooperative-sticky` moves only the partitions that
    change owner when a pod joins or leaves; `range`/`roundrobin` (eager) stop every partition of the group at each
    rebalance. Every member of a group must use the same one."""
    static_membership: bool = True
    """Join as a static member (`group.instance.id`): a pod restarted within the session timeout gets its partitions
    back without a rebalance. Needs an instance id (`instance_id`, else the pod name in `HOSTNAME`); off when none."""
    instance_id: Text | None = None
    """The static member's `group.instance.id`; empty: the `HOSTNAME` env var (the pod name in Kubernetes). Must be
    unique in the group and stable across restarts of one pod (a StatefulSet's names, or a Deployment's pod name)."""
    fetch_max_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    """Upper bound of bytes per fetch response (caps memory with a backlog)."""
    max_partition_fetch_bytes: int = Field(1024 * 1024, ge=1024)
    """Upper bound of bytes per partition per fetch."""
    shutdown_timeout_s: float = Field(20.0, gt=0)
    """On SIGTERM/SIGINT: longest time to finish the batch in hand before dropping it uncommitted and exiting 0."""
    retry_backoff_max_s: float = Field(10.0, gt=0)
    """Longest pause between retries when the sink fails (exponential backoff from 0.2 s)."""
    stall_seconds: float = Field(60.0, gt=0)
    """A partition with lag that makes no progress this long turns readiness false."""
    metrics_port: int | None = Field(9000, ge=0, le=65535)
    """Port for /healthz, /readyz and /metrics (0 picks a free port; empty disables)."""

    def dlq_for(self, topic: str) -> str:
        return self.dead_letter_topic or f"{topic}.dlq"


class ServeSettings(_Group):
    host: str = "0.0.0.0"  # noqa: S104 - a container listens on every interface
    """Address to listen on."""
    port: int = Field(8080, ge=0, le=65535)
    """HTTP port (Knative sends traffic to 8080 by default); /healthz, /readyz and /metrics are served here too."""
    grpc_port: int | None = Field(8081, ge=0, le=65535)
    """gRPC port of the Open Inference Protocol (`inference.GRPCInferenceService`) and of `grpc.health.v1`
    (KServe's default 8081); empty to serve REST only. Messages are held to `max_body_bytes` too."""
    model_name: str | None = None
    """Model name in `/v2/models/{name}` URLs and gRPC requests; default: the model file's stem."""
    max_batch_rows: int = Field(256, ge=1, le=1_000_000)
    """Adaptive batching: most rows gathered from concurrent requests into one predict call."""
    max_latency_ms: float = Field(2.0, ge=0, le=10_000)
    """Adaptive batching: longest time a request waits for others to join its batch."""
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    """Largest request body accepted; bigger ones get 413."""
    reply_type: str = "scoring.result"
    """CloudEvent `type` of the reply event."""
    sink: str | None = None
    """Optional: also write CloudEvent results to this sink (same URIs as stream mode) before replying."""
    sink_timeout_s: float = Field(30.0, gt=0, le=3600)
    """Longest wait for one sink write in serve mode; a longer one is answered 503 (Knative retries the event)."""


class SchemaRegistrySettings(_Group):
    url: str | None = None
    """Schema Registry (Confluent REST API) base URL, `http://` or `https://`; needed by a non-json
    `SCORING_STREAM__VALUE_FORMAT`."""
    username: str | None = None
    """Basic-auth user of the registry (Confluent Cloud: the API key)."""
    password: SecretStr | None = None
    """Basic-auth password of the registry (never logged or shown)."""
    ca_file: str | None = None
    """CA bundle (PEM) to verify an `https://` registry; empty means the system's CAs."""
    timeout_s: float = Field(10.0, gt=0, le=300)
    """Longest wait for one registry request; a longer one counts as the registry being unavailable."""


class RoutingSettings(_Group):
    path: str | None = None
    """Routing file (YAML or JSON) naming several model versions with weights (sticky A/B split by key) or
    `shadow: true`; replaces `--model`. Watched for changes and reloaded between batches (also on SIGHUP)."""
    poll_s: float = Field(5.0, ge=0)
    """How often the routing file and its local model files are checked for changes (0 disables polling;
    SIGHUP still reloads)."""
    threshold: float = 0.5
    """Decision threshold for shadow agreement: a pair agrees when both scores fall on the same side of it."""
    shadow_sink: str | None = None
    """Optional: store shadow rows in this sink instead of the main one (same URIs as the main sink)."""


class Settings(BaseSettings):
    """All settings. Env: `SCORING_<GROUP>__<NAME>`, e.g. `SCORING_MODEL__PATH`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        use_attribute_docstrings=True,
        extra="forbid",
        case_sensitive=False,
    )

    model: ModelSettings = Field(default_factory=ModelSettings)
    s3: S3Settings = Field(default_factory=S3Settings)
    iceberg: IcebergSettings = Field(default_factory=IcebergSettings)
    mlflow: MlflowSettings = Field(default_factory=MlflowSettings)
    scoring: ScoringSettings = Field(default_factory=ScoringSettings)
    batch: BatchSettings = Field(default_factory=BatchSettings)
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    stream: StreamSettings = Field(default_factory=StreamSettings)
    serve: ServeSettings = Field(default_factory=ServeSettings)
    routing: RoutingSettings = Field(default_factory=RoutingSettings)
    schema_registry: SchemaRegistrySettings = Field(default_factory=SchemaRegistrySettings)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Log level of the JSON log lines written to stderr."""



def env_name(path: tuple[str, ...]) -> str:
    """('model', 'path') -> 'SCORING_MODEL__PATH'."""
    return ENV_PREFIX + "__".join(p.upper() for p in path)


def field_for(path: tuple[str, ...]) -> Any:
    """The pydantic FieldInfo of a dotted setting path."""
    model: type[BaseModel] = Settings
    info = None
    for part in path:
        info = model.model_fields[part]
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
    return info


def known_env_names(model: type[BaseModel] = Settings, prefix: tuple[str, ...] = ()) -> set[str]:
    names: set[str] = set()
    for name, info in model.model_fields.items():
        ann = info.annotation
        path = (*prefix, name)
        names.add(env_name(path))
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            names |= known_env_names(ann, path)
    return names


def _groups() -> dict[str, type[BaseModel]]:
    return {env_name((name,)): info.annotation for name, info in Settings.model_fields.items()
            if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel)}


def _check_unknown_env() -> None:
    # pydantic-settings silently ignores SCORING_* variables that match no field; a typo such as
    # SCORING_MODLE__PATH would then run with defaults. Refuse instead. A group's own name
    # (SCORING_MODEL=x) would be parsed by pydantic-settings as the group's JSON and fail with a traceback.
    known = known_env_names()
    groups = _groups()
    for key in sorted(os.environ):
        name = key.upper()
        if name in groups:
            example = env_name((name.removeprefix(ENV_PREFIX).lower(), next(iter(groups[name].model_fields))))
            raise ConfigError(key, f"is a group of settings, not a setting; set one of its settings, e.g. {example}")
        if name.startswith(ENV_PREFIX) and name not in known:
            raise ConfigError(key, "unknown setting (see `scoring-worker --help` or the README for the list)")


def job_completion_index() -> int | None:
    """The pod's index in a Kubernetes Indexed Job (``JOB_COMPLETION_INDEX``), None when not in one.

    Raises ConfigError when it is not a whole number >= 0.
    """
    raw = os.environ.get("JOB_COMPLETION_INDEX")
    if raw is None or raw.strip() == "":
        return None
    try:
        value = int(raw.strip())
    except ValueError:
        value = -1
    if value < 0:
        raise ConfigError("JOB_COMPLETION_INDEX", f"must be a whole number >= 0 (got {raw!r})")
    return value


def load_settings(overrides: dict[str, Any] | None = None) -> Settings:
    """Build the settings from env vars with CLI ``overrides`` (nested dicts) on top.

    Raises ConfigError naming the first wrong setting (env name and, where known, the flag).
    """
    _check_unknown_env()
    try:
        settings = Settings(**(overrides or {}))
    except SettingsError as exc:  # an env var pydantic-settings could not even parse (e.g. bad JSON)
        field = str(exc).split('"')[1] if str(exc).count('"') >= 2 else ""
        raise ConfigError(env_name((field,)) if field else "settings", str(exc).split(" from source")[0]) from None
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = tuple(str(p) for p in err["loc"] if not isinstance(p, int))
        name = env_name(loc) if loc else "settings"
        value = err.get("input")
        shown = "" if isinstance(value, dict) or "secret" in name.lower() or "password" in name.lower() else \
            f" (got {redact(value) if isinstance(value, str) else value!r})"
        message = err["msg"].removeprefix("Value error, ")  # pydantic's prefix for a validator's own message
        raise ConfigError(name, f"{message}{shown}") from None
    st = settings.stream
    if st.max_poll_interval_ms < st.session_timeout_ms:
        raise ConfigError("SCORING_STREAM__MAX_POLL_INTERVAL_MS", f"{st.max_poll_interval_ms} must be at least "
                          f"SCORING_STREAM__SESSION_TIMEOUT_MS ({st.session_timeout_ms})")
    if st.heartbeat_interval_ms >= st.session_timeout_ms:
        raise ConfigError("SCORING_STREAM__HEARTBEAT_INTERVAL_MS", f"{st.heartbeat_interval_ms} must be below "
                          f"SCORING_STREAM__SESSION_TIMEOUT_MS ({st.session_timeout_ms})")
    # A sink or dead-letter topic that is also an input topic feeds the worker its own output, forever.
    outputs = {"SCORING_STREAM__DEAD_LETTER_TOPIC": [st.dlq_for(t) for t in st.topics]}
    sinks = (("SCORING_STREAM__SINK", st.sink), ("SCORING_ROUTING__SHADOW_SINK", settings.routing.shadow_sink))
    for name, uri in sinks:
        if uri and uri.lower().startswith("kafka://"):
            outputs[name] = [uri[len("kafka://"):].partition("?")[0].strip("/")]  # as the Kafka sink reads it
    for name, written in outputs.items():
        loop = sorted(set(written) & set(st.topics))
        if loop:
            raise ConfigError(name, f"writes to {', '.join(loop)}, which is also an input topic "
                              "(SCORING_STREAM__TOPICS): the worker would consume its own output")
    reg = settings.schema_registry
    if st.value_format != "json" and not reg.url:
        raise ConfigError("SCORING_SCHEMA_REGISTRY__URL", f"needed by SCORING_STREAM__VALUE_FORMAT={st.value_format}")
    if reg.url and not reg.url.lower().startswith(("http://", "https://")):
        raise ConfigError("SCORING_SCHEMA_REGISTRY__URL",
                          f"must start with http:// or https:// (got {redact(reg.url)!r})")
    if reg.password is not None and not reg.username:
        raise ConfigError("SCORING_SCHEMA_REGISTRY__USERNAME", "needed with SCORING_SCHEMA_REGISTRY__PASSWORD")
    b = settings.batch
    if b.shard_index is not None and b.shard_index >= b.shard_count:
        raise ConfigError(
            "SCORING_BATCH__SHARD_INDEX", f"{b.shard_index} must be below SCORING_BATCH__SHARD_COUNT ({b.shard_count})"
        )
    # Without an explicit shard index the batch run takes the Indexed Job's; an index no shard has would
    # score nothing and exit 0, so it is refused like --shard-index.
    index = job_completion_index()
    if b.shard_index is None and index is not None and index >= b.shard_count:
        raise ConfigError("JOB_COMPLETION_INDEX", f"{index} must be below SCORING_BATCH__SHARD_COUNT "
                          f"({b.shard_count}); set the shard count to the Job's completions")
    return settings


def reference_rows(model: type[BaseModel] = Settings, prefix: tuple[str, ...] = ()) -> list[tuple[str, str, str]]:
    """(env var, default, description) for every leaf setting: the README's reference table."""
    rows = []
    for name, info in model.model_fields.items():
        ann = info.annotation
        path = (*prefix, name)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows += reference_rows(ann, path)
            continue
        default = info.get_default(call_default_factory=True)
        shown = "" if default is None else (",".join(default) if isinstance(default, list) else str(default))
        rows.append((env_name(path), shown, " ".join((info.description or "").split())))
    return rows


def env_lines(settings: Settings) -> list[str]:
    """KEY=VALUE for every setting that differs from its default; secrets are never printed (SecretStr
    settings are left out, passwords inside URIs are shown as ``***``)."""
    lines = []
    defaults = Settings.model_construct()

    def walk(model: BaseModel, default: BaseModel, prefix: tuple[str, ...]) -> None:
        for name in type(model).model_fields:
            value, base = getattr(model, name), getattr(default, name, None)
            path = (*prefix, name)
            if isinstance(value, BaseModel):
                walk(value, base if isinstance(base, BaseModel) else type(value)(), path)
            elif isinstance(value, SecretStr) or value == base:
                continue
            elif value is None:  # unset where the default is set: "empty disables" (e.g. the metrics port)
                lines.append(f"{env_name(path)}=")
            else:
                shown = ",".join(value) if isinstance(value, list) else redact(str(value))
                lines.append(f"{env_name(path)}={shown}")

    walk(settings, defaults, ())
    return lines
