"""A Schema Registry client (the Confluent REST API subset a reader needs): schemas by id, cached for good.

A schema id names one schema forever, so a schema fetched once is never fetched again. What the registry
answers decides whose fault a record is:
- 404 for an id with the registry's own "schema not found" code 40403 (``SchemaNotFound``): the record names a
  schema nobody registered; it is dead-lettered. The answer is remembered for ``NOT_FOUND_TTL_S`` so a burst of
  such records costs one request. A 404 without that code is a URL that is no registry's (a missing path
  prefix): ``RegistryUnavailable``, since it would otherwise dead-letter every record of the stream.
- no answer, a timeout, 5xx, 401/403 at run time (``RegistryUnavailable``): not the record's fault; the stream
  pipeline retries with the partitions paused, readiness naming the registry, and commits nothing meanwhile.
At start-up (``check``), 401/403 and a TLS certificate the CA file does not verify are ConfigError naming the
setting; an unreachable registry only makes readiness false (it may come up later).

Stdlib HTTP (urllib) on purpose: a reader makes one request per schema id over the worker's life, so a pooled
client buys nothing, and the TLS context (``CA_FILE``) is the ssl module's own.
"""

from __future__ import annotations

import base64
import json
import logging
import ssl
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from workers.errors import ConfigError, ScoringError
from workers.settings import SchemaRegistrySettings, redact

log = logging.getLogger("workers.registry")

NOT_FOUND_TTL_S = 30.0
SCHEMA_NOT_FOUND = 40403  # the registry's error_code for an unknown schema id (Confluent, Karapace, Redpanda, Apicurio)
MAX_SCHEMA_BYTES = 8 * 1024 * 1024


class SchemaNotFound(Exception):
    """A 404: the registry does not know the schema id or subject (``code``: its error_code, None if it gave none)."""

    def __init__(self, path: str, code: int | None = None):
        super().__init__(path)
        self.code = code


class SchemaRefused(Exception):
    """The registry will not register a schema (409 incompatible with the subject's, 422 invalid)."""


class RegistryUnavailable(ScoringError):
    """The registry cannot answer now (unreachable, timeout, 5xx, refused credentials): retried."""


@dataclass
class Schema:
    """One registered schema as the registry gave it: ``text`` (Avro/JSON Schema JSON text, or base64
    FileDescriptorProto for Protobuf with ``format=serialized``), its type and references."""

    id: int
    schema_type: str
    text: str
    references: list[dict[str, Any]] = field(default_factory=list)


def _error_code(body: str) -> int | None:
    """The ``error_code`` of a registry's JSON error body, None when the body is not one."""
    try:
        code = json.loads(body).get("error_code")
    except (ValueError, AttributeError):
        return None
    return code if type(code) is int else None


def _check_url(url: str, shown: str) -> None:
    """ConfigError naming the URL setting for what urllib would only refuse with a traceback on first use."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in 0..65535
        ok = bool(parts.hostname) and not any(c.isspace() or ord(c) < 32 for c in url)
    except ValueError:
        ok = False
    if not ok:
        raise ConfigError("SCORING_SCHEMA_REGISTRY__URL", f"not a valid URL: {shown!r} (http(s)://host[:port][/path])")


def tls_context(ca_file: str | None) -> ssl.SSLContext:
    """The TLS context of an https registry; ConfigError naming CA_FILE when the file is not a PEM CA bundle."""
    try:
        return ssl.create_default_context(cafile=ca_file) if ca_file else ssl.create_default_context()
    except FileNotFoundError:
        raise ConfigError("SCORING_SCHEMA_REGISTRY__CA_FILE", f"no such file: {ca_file}") from None
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise ConfigError("SCORING_SCHEMA_REGISTRY__CA_FILE",
                          f"not a PEM CA bundle ({ca_file}): {exc}"[:300]) from None


class RegistryClient:
    """Thread-safe: the main thread fetches, the score lane reads the cache."""

    def __init__(self, settings: SchemaRegistrySettings):
        assert settings.url
        self.base = settings.url.rstrip("/")
        self.shown = redact(self.base)
        _check_url(self.base, self.shown)
        # Credentials in the URL (https://key:secret@host, Confluent's basic.auth.credentials.source=URL): urllib
        # would take them for part of the host name, so they become basic auth (the settings win over them).
        parts = urlsplit(self.base)
        user, secret = settings.username, settings.password.get_secret_value() if settings.password else ""
        if parts.username is not None:
            self.base = urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))
            if not user:
                user, secret = unquote(parts.username), unquote(parts.password or "")
        self.timeout = settings.timeout_s
        self.ctx = tls_context(settings.ca_file) if self.base.lower().startswith("https://") else None
        self.headers = {"Accept": "application/vnd.schemaregistry.v1+json, application/json"}
        if user:
            token = base64.b64encode(f"{user}:{secret}".encode()).decode()
            self.headers["Authorization"] = f"Basic {token}"
        self.schemas: dict[int, Schema] = {}
        self.missing: dict[int, float] = {}  # id -> monotonic time of the 404
        self.lock = threading.Lock()

    # -- HTTP ----------------------------------------------------------------------------------------
    def _get(self, path: str) -> Any:
        """GET ``path`` as JSON. SchemaNotFound on 404, RegistryUnavailable on anything that is not an answer."""
        request = urllib.request.Request(self.base + path, headers=self.headers)  # noqa: S310 - http(s) only
        try:
            with urllib.request.urlopen(request, timeout=self.timeout, context=self.ctx) as reply:  # noqa: S310
                body = reply.read(MAX_SCHEMA_BYTES + 1)
        except urllib.error.HTTPError as exc:
            detail = exc.read(300).decode("utf-8", "replace").strip()
            if exc.code == 404:
                raise SchemaNotFound(path, _error_code(detail)) from None
            raise RegistryUnavailable(f"schema registry {self.shown} answered {exc.code} for {path}"
                                      + (f": {detail}" if detail else "")) from None
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            reason = getattr(exc, "reason", exc)  # urllib wraps the socket's error, a TLS verification one too
            if isinstance(reason, ssl.SSLCertVerificationError):
                raise RegistryUnavailable(f"schema registry {self.shown}: TLS certificate not verified "
                                          f"({reason.verify_message})") from None
            raise RegistryUnavailable(f"schema registry {self.shown} unreachable: {reason}") from None
        if len(body) > MAX_SCHEMA_BYTES:
            raise RegistryUnavailable(f"schema registry {self.shown}: answer to {path} over {MAX_SCHEMA_BYTES} bytes")
        try:
            return json.loads(body)
        except ValueError:
            raise RegistryUnavailable(f"schema registry {self.shown}: answer to {path} is not JSON") from None

    def probe(self) -> str | None:
        """Why the registry does not answer now, None when it does (no ConfigError: used while running)."""
        try:
            self._get("/schemas/types")
        except SchemaNotFound:
            return None
        except RegistryUnavailable as exc:
            return str(exc)
        return None

    def check(self) -> str | None:
        """Start-up probe: ConfigError for credentials refused or a certificate not verified; the reason when the
        registry does not answer (readiness false; fetching retries), None when it does."""
        try:
            self._get("/schemas/types")
        except SchemaNotFound:
            return None  # an older registry without /schemas/types: it answered
        except RegistryUnavailable as exc:
            text = str(exc)
            if " answered 401" in text or " answered 403" in text:
                raise ConfigError("SCORING_SCHEMA_REGISTRY__PASSWORD",
                                  f"the registry refused the credentials of SCORING_SCHEMA_REGISTRY__USERNAME "
                                  f"({text.split(' answered ', 1)[1][:3]})") from None
            if "TLS certificate not verified" in text:
                raise ConfigError("SCORING_SCHEMA_REGISTRY__CA_FILE", text.split(": ", 1)[1]) from None
            return text
        return None

    # -- schemas -------------------------------------------------------------------------------------
    def cached(self, schema_id: int) -> Schema | None:
        """The schema if fetched (no I/O); None also for an id the registry did not know."""
        return self.schemas.get(schema_id)

    def known_missing(self, schema_id: int) -> bool:
        return schema_id in self.missing

    def fetch(self, schema_id: int, serialized: bool = False) -> Schema | None:
        """The schema of ``schema_id`` (cached), or None when the registry does not know it (404, remembered for
        a while). RegistryUnavailable when the registry cannot answer."""
        with self.lock:
            if schema_id in self.schemas:
                return self.schemas[schema_id]
            seen = self.missing.get(schema_id)
            if seen is not None and time.monotonic() - seen < NOT_FOUND_TTL_S:
                return None
        query = "?format=serialized" if serialized else ""
        try:
            got = self._get(f"/schemas/ids/{schema_id}{query}")
        except SchemaNotFound as exc:
            if exc.code != SCHEMA_NOT_FOUND:
                raise RegistryUnavailable(
                    f"schema registry {self.shown} answered 404 for /schemas/ids/{schema_id} without its 'schema "
                    f"not found' code {SCHEMA_NOT_FOUND} (is SCORING_SCHEMA_REGISTRY__URL the registry's base "
                    f"URL?)") from None
            with self.lock:
                self.missing[schema_id] = time.monotonic()
            return None
        if not isinstance(got, dict):
            raise RegistryUnavailable(f"schema registry {self.shown}: answer to /schemas/ids/{schema_id} is "
                                      f"not a JSON object")
        schema = Schema(schema_id, str(got.get("schemaType") or "AVRO").upper(), str(got.get("schema", "")),
                        list(got.get("references") or []))
        with self.lock:
            self.schemas[schema_id] = schema
            self.missing.pop(schema_id, None)
        return schema

    def reference(self, subject: str, version: int, serialized: bool = False) -> tuple[str, list[dict[str, Any]]]:
        """The schema text and references of a referenced subject version (Protobuf imports, Avro named types);
        RegistryUnavailable or SchemaNotFound when it cannot be had."""
        query = "?format=serialized" if serialized else ""
        got = self._get(f"/subjects/{quote(subject, safe='')}/versions/{int(version)}{query}")
        if not isinstance(got, dict):
            raise RegistryUnavailable(f"schema registry {self.shown}: answer for subject {subject!r} version "
                                      f"{version} is not a JSON object")
        return str(got.get("schema", "")), list(got.get("references") or [])

    def subject_version(self, subject: str, version: str = "latest", serialized: bool = False) -> dict[str, Any]:
        """``GET /subjects/{subject}/versions/{version}`` (a number or ``latest``) as the registry answers it;
        SchemaNotFound for an unknown subject or version, RegistryUnavailable when it cannot answer."""
        query = "?format=serialized" if serialized else ""
        got = self._get(f"/subjects/{quote(subject, safe='')}/versions/{version}{query}")
        if not isinstance(got, dict):
            raise RegistryUnavailable(f"schema registry {self.shown}: answer for subject {subject!r} is not an object")
        return got

    # -- writing -------------------------------------------------------------------------------------
    def register(self, subject: str, schema: str, schema_type: str) -> int:
        """Register ``schema`` under ``subject`` (POST /subjects/{s}/versions; the same schema gets the same id)
        and return its id. ``SchemaRefused`` when the registry will not take it (409 incompatible, 422 invalid):
        a setting's fault; RegistryUnavailable when it cannot answer."""
        body = json.dumps({"schema": schema, **({} if schema_type == "AVRO" else {"schemaType": schema_type})})
        request = urllib.request.Request(  # noqa: S310 - http(s) only
            f"{self.base}/subjects/{quote(subject, safe='')}/versions", data=body.encode(), method="POST",
            headers={**self.headers, "Content-Type": "application/vnd.schemaregistry.v1+json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout, context=self.ctx) as reply:  # noqa: S310
                got = json.loads(reply.read(MAX_SCHEMA_BYTES))
        except urllib.error.HTTPError as exc:
            detail = exc.read(300).decode("utf-8", "replace").strip()
            if exc.code in (409, 422):
                raise SchemaRefused(f"schema registry {self.shown} refused the result schema for subject "
                                    f"{subject!r} ({exc.code}{': ' + detail if detail else ''})") from None
            raise RegistryUnavailable(f"schema registry {self.shown} answered {exc.code} registering {subject!r}"
                                      + (f": {detail}" if detail else "")) from None
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            raise RegistryUnavailable(f"schema registry {self.shown} unreachable: "
                                      f"{getattr(exc, 'reason', exc)}") from None
        except ValueError:
            raise RegistryUnavailable(f"schema registry {self.shown}: answer registering {subject!r} is not JSON") \
                from None
        try:
            return int(got["id"])
        except (KeyError, TypeError, ValueError):
            raise RegistryUnavailable(f"schema registry {self.shown}: no id in its answer registering "
                                      f"{subject!r}") from None
