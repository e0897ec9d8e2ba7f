"""The CLI's options: each flag generated from a settings field (help = the field's docstring, naming the env
var; click type from the field's type), and the option groups the commands share.

A command lists only the options it uses: an option shown but ignored is a lie.
"""

from __future__ import annotations

import functools
import typing
from collections.abc import Callable
from typing import Any

import click

from workers.logs import setup_logging
from workers.settings import Settings, env_name, field_for, load_settings

FLAGS: dict[tuple[str, ...], str] = {}


class _OrEmpty(click.ParamType):
    """``inner``, or the empty text: an optional setting given as ``--x ""`` means unset ("empty disables")."""

    def __init__(self, inner: click.ParamType):
        self.inner = inner
        self.name = inner.name

    def get_metavar(self, param: click.Parameter, ctx: click.Context) -> str | None:
        return self.inner.get_metavar(param, ctx)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        return "" if value == "" else self.inner.convert(value, param, ctx)


def click_type(annotation: Any) -> click.ParamType:
    """The click type of a settings field, so ``--help`` shows INTEGER, FLOAT or the choices and a wrong
    value is refused by name; range checks stay with the settings (one place for env vars and flags)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    optional = len(args) < len(typing.get_args(annotation))
    base = args[0] if optional and len(args) == 1 else annotation
    if typing.get_origin(base) is typing.Literal:
        kind: click.ParamType = click.Choice([str(v) for v in typing.get_args(base)])
    elif base is int:
        kind = click.INT
    elif base is float:
        kind = click.FLOAT
    else:
        kind = click.STRING
    return _OrEmpty(kind) if optional and kind is not click.STRING else kind


def setting(flag: str, path: str, *, is_flag: bool = False, multiple: bool = False,
            aliases: tuple[str, ...] = ()) -> Callable:
    """A click option bound to the setting at dotted ``path`` (e.g. 'model.path'). ``aliases``: other spellings
    accepted too (KServe's model servers take ``--model_dir``, ``--model_name``, ``--http_port``...)."""
    parts = tuple(path.split("."))
    info = field_for(parts)
    FLAGS[parts] = flag.split("/")[0]
    text = " ".join((info.description or "").split())
    dest = "__".join(parts)
    kwargs: dict[str, Any] = {"default": None, "help": f"{text} [env: {env_name(parts)}]"}
    if is_flag:
        flag = f"{flag}/--no-{flag[2:]}"
    elif not multiple:
        kwargs["type"] = click_type(info.annotation)
    if multiple:
        kwargs["multiple"] = True
    return click.option(flag, *aliases, dest, **kwargs)


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


# Option groups.
model_options = options(
    setting("--model", "model.path"),
    setting("--model-dir", "model.dir", aliases=("--model_dir",)),
    setting("--model-sha256", "model.sha256"),
    setting("--model-version", "model.version"),
    setting("--threads", "model.threads"),
    setting("--backend", "model.backend"),
    setting("--cache-dir", "model.cache_dir"),
    setting("--mlflow-tracking-uri", "mlflow.tracking_uri"),
    setting("--mlflow-poll-s", "mlflow.poll_s"),
)
routing_options = options(
    setting("--routing", "routing.path"),
    setting("--routing-poll-s", "routing.poll_s"),
    setting("--shadow-sink", "routing.shadow_sink"),
)
scoring_options = options(
    setting("--id-column", "scoring.id_column"),
    setting("--passthrough", "scoring.passthrough"),
    setting("--explain", "scoring.explain"),
    setting("--explain-top-k", "scoring.explain_top_k"),
)
s3_options = options(
    setting("--s3-endpoint-url", "s3.endpoint_url"),
    setting("--s3-region", "s3.region"),
    setting("--log-level", "log_level"),
)
common = options(model_options, routing_options, scoring_options, s3_options)


kafka_options = options(
    setting("--bootstrap-servers", "kafka.bootstrap_servers"),
    setting("--security-protocol", "kafka.security_protocol"),
    setting("--sasl-mechanism", "kafka.sasl_mechanism"),
    setting("--sasl-username", "kafka.sasl_username"),
    setting("--ssl-cafile", "kafka.ssl_cafile"),
    setting("--ssl-certfile", "kafka.ssl_certfile"),
    setting("--ssl-keyfile", "kafka.ssl_keyfile"),
    setting("--ssl-check-hostname", "kafka.ssl_check_hostname", is_flag=True),
    setting("--topic", "stream.topics", multiple=True),
    setting("--group", "stream.group"),
    setting("--sink", "stream.sink"),
    setting("--dead-letter-topic", "stream.dead_letter_topic"),
    setting("--on-bad-record", "stream.on_bad_record"),
    setting("--key-as-id", "stream.key_as_id", is_flag=True),
    setting("--value-format", "stream.value_format"),
    setting("--schema-registry-url", "schema_registry.url"),
    setting("--schema-registry-username", "schema_registry.username"),
    setting("--schema-registry-ca-file", "schema_registry.ca_file"),
    setting("--max-records", "stream.max_records"),
    setting("--max-wait-ms", "stream.max_wait_ms"),
    setting("--auto-offset-reset", "stream.auto_offset_reset"),
    setting("--session-timeout-ms", "stream.session_timeout_ms"),
    setting("--heartbeat-interval-ms", "stream.heartbeat_interval_ms"),
    setting("--max-poll-interval-ms", "stream.max_poll_interval_ms"),
    setting("--assignment-strategy", "stream.assignment_strategy"),
    setting("--static-membership", "stream.static_membership", is_flag=True),
    setting("--instance-id", "stream.instance_id"),
    setting("--fetch-max-bytes", "stream.fetch_max_bytes"),
    setting("--max-partition-fetch-bytes", "stream.max_partition_fetch_bytes"),
    setting("--shutdown-timeout-s", "stream.shutdown_timeout_s"),
    setting("--stall-seconds", "stream.stall_seconds"),
    setting("--metrics-port", "stream.metrics_port"),
)
