"""Models from the MLflow registry: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/RUN_ID/PATH``.

Resolved through the tracking server's REST API with the standard library (the ``mlflow`` package is not a
runtime dependency: a worker needs four GET requests, not a 300 MB client). Only the LightGBM flavor's text
model (``model.lgb``, what ``mlflow.lightgbm.log_model`` writes for a ``Booster``) is accepted; a pickled or skops
model (an ``LGBMClassifier`` logged as is) is refused from its ``MLmodel`` file, before anything is downloaded.
The bytes then go through the same pin and load-time checks as a file (``model.load_model``).

Downloads are cached under ``SCORING_MODEL__CACHE_DIR/mlflow``: the file by its SHA-256, and an index from
(server, artifact location) to that hash. A registered version's artifacts do not change, so a restart or a
reload of the same version reads the cache (re-hashed on every read) and makes only the resolve call.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

import yaml

from workers.errors import ModelError
from workers.settings import REGISTRY_SCHEMES, MlflowSettings, S3Settings, redact
from workers.storage import read_bytes

PATH_SETTING = "SCORING_MODEL__PATH"
URI_SETTING = "SCORING_MLFLOW__TRACKING_URI"
_ALIAS = re.compile(r"^models:/([^/@]+)@([^/@]+)$")
_VERSION = re.compile(r"^models:/([^/@]+)/(\d+)$")
_RUN = re.compile(r"^runs:/([0-9A-Za-z_-]+)/(.+)$")
HOW_TO = ("log the Booster itself: mlflow.lightgbm.log_model(model.booster_, name=...) (an LGBMClassifier's "
          "booster_), which stores the text model model.lgb")


def is_registry_uri(uri: str | None) -> bool:
    return isinstance(uri, str) and uri.startswith(REGISTRY_SCHEMES)


def alias_of(uri: str) -> tuple[str, str] | None:
    """(name, alias) of a ``models:/NAME@ALIAS`` URI: the kind a worker follows; None for any other."""
    match = _ALIAS.match(uri)
    return (urllib.parse.unquote(match.group(1)), match.group(2)) if match else None


@dataclass(frozen=True)
class Resolved:
    uri: str
    label: str  # the default model_version: NAME/VERSION, or RUN_ID/PATH
    artifacts: str  # the model's directory (an artifact URI)
    version: str | None = None


class RegistryError(ModelError):
    """The registry answered no such model/alias/version, or could not be reached (``unreachable``)."""

    def __init__(self, setting: str, reason: str, unreachable: bool = False):
        super().__init__(setting, reason)
        self.unreachable = unreachable


class Registry:
    """REST calls to one MLflow tracking server (see the module docstring)."""

    def __init__(self, settings: MlflowSettings, s3: S3Settings | None = None):
        self.settings = settings
        self.s3 = s3 or S3Settings()
        self.base = (settings.tracking_uri or "").rstrip("/")

    # -- HTTP ------------------------------------------------------------------------------------
    def _headers(self) -> dict[str, str]:
        s = self.settings
        if s.token is not None:
            return {"Authorization": f"Bearer {s.token.get_secret_value()}"}
        if s.username and s.password is not None:
            pair = f"{s.username}:{s.password.get_secret_value()}".encode()
            return {"Authorization": "Basic " + base64.b64encode(pair).decode()}
        return {}

    def _fetch(self, url: str, what: str) -> bytes:
        shown = redact(self.base)
        # The base URL is http(s) (validated in settings); artifact URLs are built on it.
        request = urllib.request.Request(url, headers={**self._headers(), "User-Agent": "scoring-workers"})  # noqa: S310
        try:
            with urllib.request.urlopen(request, timeout=self.settings.timeout_s) as reply:  # noqa: S310
                return bytes(reply.read())
        except urllib.error.HTTPError as exc:
            body = exc.read()[:2000].decode(errors="replace")
            try:
                message = json.loads(body).get("message") or body
            except (ValueError, AttributeError):
                message = body
            message = " ".join(str(message).split())[:300]
            if exc.code in (401, 403):
                setting = "SCORING_MLFLOW__TOKEN" if self.settings.token else (
                    "SCORING_MLFLOW__USERNAME" if self.settings.username else URI_SETTING)
                raise RegistryError(setting, f"the MLflow server {shown} refused the credentials for {what} "
                                             f"(HTTP {exc.code})") from None
            if exc.code == 404 or exc.code == 400:
                raise RegistryError(PATH_SETTING, f"{what}: {message or f'HTTP {exc.code}'}") from None
            raise RegistryError(URI_SETTING, f"the MLflow server {shown} answered HTTP {exc.code} for {what}: "
                                             f"{message}", unreachable=exc.code >= 500) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise RegistryError(URI_SETTING, f"cannot reach the MLflow server {shown} for {what}: {reason}",
                                unreachable=True) from None

    def _api(self, path: str, what: str, **params: str) -> dict:
        data = self._fetch(f"{self.base}/api/2.0/mlflow/{path}?{urllib.parse.urlencode(params)}", what)
        try:
            parsed = json.loads(data)
        except ValueError:
            raise RegistryError(URI_SETTING, f"{redact(self.base)} did not answer {what} with JSON; is it an MLflow "
                                             "server?", unreachable=True) from None
        return parsed if isinstance(parsed, dict) else {}

    # -- resolve ---------------------------------------------------------------------------------
    def resolve(self, uri: str) -> Resolved:
        """The version a registry URI names now (for an alias: where it points at this moment)."""
        if not self.base:
            raise ModelError(URI_SETTING, f"must be set to load {uri} (the MLflow tracking server's URL)")
        if (match := _ALIAS.match(uri)) is not None:
            name, alias = urllib.parse.unquote(match.group(1)), match.group(2)
            got = self._api("registered-models/alias", f"{uri} (alias {alias!r} of registered model {name!r})",
                            name=name, alias=alias).get("model_version") or {}
            version = str(got.get("version") or "")
            if not version:
                raise RegistryError(PATH_SETTING, f"{uri}: the MLflow server names no version for it")
        elif (match := _VERSION.match(uri)) is not None:
            name, version = urllib.parse.unquote(match.group(1)), match.group(2)
            got = self._api("model-versions/get", f"{uri} (version {version} of registered model {name!r})",
                            name=name, version=version).get("model_version") or {}
        elif (match := _RUN.match(uri)) is not None:
            return self._resolve_run(uri, match.group(1), match.group(2).strip("/"))
        else:
            raise ModelError(PATH_SETTING, f"{uri} is not a registry URI; use models:/NAME@ALIAS, "
                                           "models:/NAME/VERSION or runs:/RUN_ID/PATH")
        if got.get("status") not in (None, "READY"):
            raise RegistryError(PATH_SETTING, f"{uri}: version {version} is {got.get('status')}, not READY")
        where = self._api("model-versions/get-download-uri", f"{uri} (artifact location)", name=name,
                          version=version).get("artifact_uri")
        if not where:
            raise RegistryError(PATH_SETTING, f"{uri}: the MLflow server gives no artifact location for it")
        return Resolved(uri, f"{name}/{version}", str(where), version)

    def _resolve_run(self, uri: str, run_id: str, path: str) -> Resolved:
        run = self._api("runs/get", f"{uri} (run {run_id})", run_id=run_id).get("run") or {}
        root = str((run.get("info") or {}).get("artifact_uri") or "").rstrip("/")
        if root and self._exists(f"{root}/{path}/MLmodel"):
            return Resolved(uri, f"{run_id}/{path}", f"{root}/{path}")
        # MLflow 3 logs a model outside the run's artifacts, as a "logged model" the run lists as an output.
        for output in ((run.get("outputs") or {}).get("model_outputs") or []):
            model_id = output.get("model_id")
            if not model_id:
                continue
            info = self._api(f"logged-models/{urllib.parse.quote(str(model_id))}", f"{uri} (logged model)")
            info = (info.get("model") or {}).get("info") or {}
            if info.get("name") == path and info.get("artifact_uri"):
                return Resolved(uri, f"{run_id}/{path}", str(info["artifact_uri"]))
        raise RegistryError(PATH_SETTING, f"{uri}: run {run_id} has no model at {path!r}")

    # -- artifacts -------------------------------------------------------------------------------
    def _artifact_url(self, artifact: str) -> str | None:
        """An HTTP URL for an ``mlflow-artifacts:`` URI (the server's artifact proxy), else None."""
        parsed = urllib.parse.urlparse(artifact)
        if parsed.scheme != "mlflow-artifacts":
            return None
        base = self.base
        if parsed.netloc:  # mlflow-artifacts://host:port/path names the proxy's host
            base = f"{urllib.parse.urlparse(self.base).scheme}://{parsed.netloc}"
        return f"{base}/api/2.0/mlflow-artifacts/artifacts/{urllib.parse.quote(parsed.path.lstrip('/'))}"

    def _read(self, artifact: str, what: str) -> bytes:
        url = self._artifact_url(artifact)
        if url is not None:
            return self._fetch(url, what)
        if artifact.startswith(("s3://", "file://", "/")):
            try:
                return read_bytes(artifact, self.s3)
            except OSError as exc:
                raise RegistryError(PATH_SETTING, f"cannot read {what} at {redact(artifact)}: {exc}") from None
        raise RegistryError(PATH_SETTING, f"{what}: artifact location {redact(artifact)} is not supported (use the "
                                          "server's artifact proxy, --serve-artifacts, or s3://)")

    def _exists(self, artifact: str) -> bool:
        try:
            self._read(artifact, artifact)
        except RegistryError as exc:
            if exc.unreachable or exc.setting != PATH_SETTING:
                raise
            return False
        return True

    def download(self, resolved: Resolved, cache_dir: str) -> bytes:
        """The text model of a resolved version (from the cache when it is there, intact)."""
        index = os.path.join(cache_dir, "mlflow", "index",
                             hashlib.sha256(f"{self.base}\n{resolved.artifacts}".encode()).hexdigest())
        cached = _cached(cache_dir, index)
        if cached is not None:
            return cached
        uri = resolved.uri
        meta = self._read(f"{resolved.artifacts}/MLmodel", f"{uri} (its MLmodel file)")
        try:
            flavors = (yaml.safe_load(meta) or {}).get("flavors") or {}
        except (yaml.YAMLError, AttributeError):
            raise RegistryError(PATH_SETTING, f"{uri}: its MLmodel file is not valid YAML") from None
        flavor = flavors.get("lightgbm")
        if not isinstance(flavor, dict):
            raise RegistryError(PATH_SETTING, f"{uri} is not a LightGBM model (flavors: "
                                              f"{', '.join(sorted(flavors)) or 'none'}); {HOW_TO}")
        data_file = str(flavor.get("data") or "")
        kind = str(flavor.get("model_class") or "")
        if not data_file.endswith((".lgb", ".txt")) or kind not in ("", "lightgbm.basic.Booster"):
            form = flavor.get("serialization_format") or data_file.rsplit(".", 1)[-1]
            raise RegistryError(PATH_SETTING, f"{uri} holds a {kind or 'LightGBM'} saved as {data_file} ({form}); "
                                              f"only the text model is loaded, never a pickle or skops file: {HOW_TO}")
        data = self._read(f"{resolved.artifacts}/{data_file}", f"{uri} ({data_file})")
        _store(cache_dir, index, data)
        return data


def _cached(cache_dir: str, index: str) -> bytes | None:
    try:
        with open(index) as f:
            digest = f.read().strip()
        with open(os.path.join(cache_dir, "mlflow", f"{digest}.lgb"), "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data if hashlib.sha256(data).hexdigest() == digest else None


def _store(cache_dir: str, index: str, data: bytes) -> None:
    """Write the file by its hash, then the index (each by rename, so a reader never sees half a file)."""
    digest = hashlib.sha256(data).hexdigest()
    blob = os.path.join(cache_dir, "mlflow", f"{digest}.lgb")
    try:
        os.makedirs(os.path.dirname(index), exist_ok=True)
        for path, content in ((blob, data), (index, digest.encode())):
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "wb") as f:
                f.write(content)
            os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs the download next time


def fetch_model(uri: str, settings: MlflowSettings, s3: S3Settings | None, cache_dir: str) -> tuple[bytes, str]:
    """(text model bytes, default model_version) of a registry URI; RegistryError/ModelError, one line."""
    registry = Registry(settings, s3)
    resolved = registry.resolve(uri)
    return registry.download(resolved, cache_dir), resolved.label
