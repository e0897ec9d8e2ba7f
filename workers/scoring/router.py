"""The router: several model versions behind one scorer interface.

Each record is *served* by one version, chosen by a sticky hash of its routing key against the weights
(``sticky.assign``), and additionally scored by every *shadow* version. Results carry ``model_version`` and
``served``; sinks key rows by (id, model_version), so a served row and its shadow rows never collide.

Versions may differ in their features: versions with the same features and category mappings share one
decoding ("signature"); a record is rejected (errors / dead letter) only when its *served* version cannot
decode it. A shadow version that cannot decode a record, whose predict fails, or (batch) whose feature
columns an input file lacks, skips those rows (counted in ``skipped`` and the version-errors metric).
A served canary whose predict raises is replaced by the primary version for those rows (counted as errors,
which a guardrail can act on). The primary is the served version with the largest weight.

A single ``--model`` is a router with one version: the same code path, without hashing.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from workers.decode.jsonparse import parse_values
from workers.decode.records import Decoded, RecordDecoder
from workers.errors import ConfigError, InputError
from workers.observability import Metrics
from workers.scoring import sticky
from workers.scoring.drift import DriftHook
from workers.scoring.features import Features
from workers.scoring.guard import GuardBook
from workers.scoring.model import Model, load_model
from workers.scoring.routing_spec import SETTING, Guardrail, RoutingSpec
from workers.scoring.scorer import Scored, Scorer
from workers.scoring.version_stats import compare_shadow, observe_version
from workers.settings import MlflowSettings, ModelSettings, S3Settings, ScoringSettings

log = logging.getLogger("workers.rollout")


@dataclass
class Version:
    name: str
    model: Model
    scorer: Scorer
    weight: int
    shadow: bool = False
    guardrail: Guardrail | None = None
    signature: int = 0  # index of its decoding in Router.decoders

    @property
    def role(self) -> str:
        return "shadow" if self.shadow else "served"


@dataclass
class Routed:
    """A decoded batch: features per signature plus what routing and the result rows need."""

    n: int
    ids: pa.Array
    features: list[Features]
    keys: list[str]
    raw: list | None = None  # input values of rejected rows (index -> dict), for the errors' raw column
    passthrough: dict[str, list] = field(default_factory=dict)
    absent: frozenset[int] = frozenset()  # signatures (shadow-only) whose feature columns the batch lacks

    @property
    def primary(self) -> Features:
        return self.features[0]


@dataclass
class Job:
    version: Version
    rows: np.ndarray  # positions in the batch
    features: Features  # the rows' features (reasons re-indexed to the subset)

    def matrix(self) -> np.ndarray:
        return self.version.scorer.good_matrix(self.features)


def _signature(model: Model) -> str:
    return repr((model.feature_names, sorted(model.categorical.items())))


def _subset(feats: Features, rows: np.ndarray) -> Features:
    matrix = feats.matrix[rows] if rows.size != feats.matrix.shape[0] else feats.matrix
    reasons: dict[int, str] = {}
    if feats.reasons:
        for r, why in feats.reasons.items():
            j = int(np.searchsorted(rows, r))
            if j < rows.size and rows[j] == r:
                reasons[j] = why
    return Features(np.ascontiguousarray(matrix), reasons)


class Router:
    """The entry point of scoring in every mode. Its ~25 methods stay on one class for a reason: each reads the
    same version list, decoders and guardrails, and the modes enter at different steps (``decode`` or
    ``from_table``, then ``plan``/``predict`` where serve batches predictions itself, then ``finish``);
    per-version metrics and shadow comparison are in ``workers.scoring.version_stats``."""

    def __init__(self, versions: list[Version], scoring: ScoringSettings, key: str | None = None,
                 threshold: float = 0.5, generation: str = "", metrics: Metrics | None = None,
                 guards: GuardBook | None = None, drift: DriftHook | None = None):
        self.versions = versions
        self.scoring = scoring
        self.id_column = scoring.id_column
        self.key = key if key and key != scoring.id_column else None
        self.threshold = threshold
        self.generation = generation
        self.metrics = metrics if metrics is not None else Metrics()  # never None: a private registry then
        #: drift on the scoring path (``SCORING_SCORING__PROFILE``); fed by ``observe``
        self.drift = drift
        served = [v for v in versions if not v.shadow]
        self.primary = max(served, key=lambda v: v.weight)
        # The primary's decoding comes first: its ids, raw values and drift matrix are the batch's.
        self.versions.sort(key=lambda v: v is not self.primary)
        sigs: dict[str, int] = {}
        self.decoders: list[RecordDecoder] = []
        self.feature_scorers: list[Scorer] = []
        extra = [self.key] if self.key and self.key not in scoring.passthrough else []
        for v in self.versions:
            sig = _signature(v.model)
            if sig not in sigs:
                sigs[sig] = len(sigs)
                self.decoders.append(RecordDecoder(v.model, scoring.id_column, False,
                                                   [*scoring.passthrough, *extra]))
                self.feature_scorers.append(v.scorer)
            v.signature = sigs[sig]
        self.guards = guards or GuardBook()
        if guards is None:
            self.guards.attach(self)
        #: rows each shadow version could not score (it skipped them), since this router was built
        self.skipped: Counter = Counter()

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def single(cls, model: Model, scoring: ScoringSettings, metrics: Metrics | None = None,
               guards: GuardBook | None = None, drift: DriftHook | None = None) -> Router:
        return cls([Version(model.version, model, Scorer.from_settings(model, scoring), 100)], scoring,
                   generation=model.sha256[:12], metrics=metrics, guards=guards, drift=drift)

    @classmethod
    def from_spec(cls, spec: RoutingSpec, digest: str, base: ModelSettings, s3: S3Settings,
                  scoring: ScoringSettings, threshold: float, origin: str, metrics: Metrics | None = None,
                  guards: GuardBook | None = None, drift: DriftHook | None = None,
                  mlflow: MlflowSettings | None = None) -> Router:
        """Load every version of a routing file (``models:/`` ones resolved with ``mlflow``); ConfigError naming
        the file and the version on failure."""
        versions = []
        for spec_v in spec.versions:
            settings = base.model_copy(update={"path": spec_v.model, "sha256": spec_v.sha256,
                                               "version": spec_v.name})
            try:
                model = load_model(settings, s3, mlflow)
            except ConfigError as exc:
                raise ConfigError(SETTING, f"{origin}: version {spec_v.name!r}: "
                                           f"{exc.reason}") from None
            versions.append(Version(spec_v.name, model, Scorer.from_settings(model, scoring), spec_v.weight or 0,
                                    spec_v.shadow, spec_v.guardrail))
        generation = digest[:12] + ":" + ",".join(v.model.sha256[:12] for v in versions)
        return cls(versions, scoring, spec.key, threshold, generation, metrics, guards, drift)

    # -- properties the modes use ----------------------------------------------------------------
    @property
    def served(self) -> list[Version]:
        return [v for v in self.versions if not v.shadow]

    @property
    def shadows(self) -> list[Version]:
        return [v for v in self.versions if v.shadow and not self.guards.is_tripped(v)]

    @property
    def fingerprint(self) -> str:
        """What the results depend on (batch ledger): versions, weights, roles and model hashes."""
        return ";".join(f"{v.name}@{v.model.sha256[:12]}:{'shadow' if v.shadow else v.weight}"
                        for v in sorted(self.versions, key=lambda v: v.name))

    def effective_weights(self) -> list[float]:
        served = self.served
        weights = [0.0 if self.guards.is_tripped(v) else float(v.weight) for v in served]
        if not any(weights):  # every canary tripped and the primary had weight 0: keep serving the primary
            weights[served.index(self.primary)] = 1.0
        return weights

    def describe(self) -> list[dict]:
        return [{"version": v.name, "role": v.role, "weight": v.weight, "sha256": v.model.sha256,
                 "backend": v.model.backend, "tripped": self.guards.is_tripped(v)} for v in self.versions]

    def publish(self) -> None:
        weights = dict(zip([v.name for v in self.served], self.effective_weights(), strict=True))
        self.metrics.routing_weight.clear()
        for v in self.versions:
            self.metrics.routing_weight.labels(v.name, v.role).set(0 if v.shadow else weights[v.name])

    def _served_signatures(self) -> set[int]:
        return {v.signature for v in self.served}

    def check_columns(self, names: list[str] | pa.Schema) -> dict[str, str]:
        """Raise InputError when a column a *served* version needs (or the routing key) is missing: only served
        versions decide whether an input can be scored. Returns, per shadow version that cannot score this
        input, the reason (it is skipped for the input, its rows counted in ``skipped``)."""
        served = self._served_signatures()
        absent: dict[str, str] = {}
        for sig, scorer in enumerate(self.feature_scorers):
            if sig in served:
                scorer.check_columns(names)
                continue
            try:
                scorer.check_columns(names)
            except InputError as exc:
                absent.update({v.name: str(exc) for v in self.versions if v.signature == sig})
        if self.key:
            present = names.names if isinstance(names, pa.Schema) else names
            if self.key not in present:
                raise InputError(f"missing routing key column '{self.key}'")
        return absent

    def input_columns(self, schema: pa.Schema | None = None) -> list[str]:
        """The columns to read; with ``schema``, those it has (a shadow-only feature may be absent)."""
        cols = [self.id_column]
        for scorer in self.feature_scorers:
            cols += scorer.model.feature_names
        cols += self.scoring.passthrough
        if self.key:
            cols.append(self.key)
        if schema is not None:
            cols = [c for c in cols if c in schema.names]
        return list(dict.fromkeys(cols))

    # -- decoding --------------------------------------------------------------------------------
    def decode(self, values: Sequence[bytes | None], keys: Sequence[bytes | None] | None = None,
               key_as_id: bool = False, parse: Callable[[Sequence[bytes | None]], Any] | None = None,
               rows: Callable[[RecordDecoder, Sequence[bytes | None], Sequence[bytes | None] | None],
                              Decoded | None] | None = None) -> tuple[Routed, Decoded]:
        """JSON records -> a routed batch (and the primary decoding: ids, passthrough, raw values). ``parse``: a
        wire format's reader (``workers.decode.wire``), run once for every decoder; ``rows``: its native
        reader (``WireFormat.rows``), tried first when there is one decoder."""
        for decoder in self.decoders:
            decoder.key_as_id = key_as_id
        decoded: list[Decoded] = []
        if rows is not None and len(self.decoders) == 1:
            got = rows(self.decoders[0], values, keys)
            if got is not None:
                decoded.append(got)
        if not decoded:
            parsed = parse(values) if parse is not None else None
            from_json = parse is None and len(self.decoders) > 1
            if from_json:  # several decoders (versions with other features): the JSON batch is parsed once for all
                parsed = parse_values(values)
            for decoder in self.decoders:
                decoded.append(decoder.decode(values, keys, parsed, from_json))
        first = decoded[0]
        passthrough = dict(first.passthrough)
        route_keys = first.ids
        if self.key:
            values_k = passthrough[self.key] if self.key in self.scoring.passthrough else passthrough.pop(self.key)
            route_keys = [v if isinstance(v, str) else (rid if v is None else str(v))
                          for v, rid in zip(values_k, first.ids, strict=True)]
        routed = Routed(len(values), pa.array(first.ids, pa.string()), [d.features for d in decoded],
                        [k if k is not None else "" for k in route_keys], first.raw, passthrough)
        if self.drift is not None:
            self.observe(self.primary.scorer.good_matrix(first.features))
        return routed, Decoded(first.ids, first.features, passthrough, first.raw)

    def from_table(self, batch: pa.RecordBatch | pa.Table) -> Routed:
        """An Arrow batch (batch mode) -> a routed batch. A shadow-only decoding whose columns the batch lacks
        is marked absent (its versions skip the batch); a served one raises InputError."""
        served = self._served_signatures()
        feats, absent = [], set()
        for sig, scorer in enumerate(self.feature_scorers):
            if sig not in served and any(c not in batch.schema.names for c in scorer.model.feature_names):
                absent.add(sig)
                feats.append(Features(np.empty((batch.num_rows, 0)), {}))
            else:
                feats.append(scorer.features(batch))
        ids = batch.column(self.id_column)
        keys: list[str] = []
        if len(self.served) > 1:
            source = batch.column(self.key) if self.key else ids
            text = pc.cast(source, pa.string()) if not pa.types.is_string(source.type) else source
            if self.key:
                text = pc.coalesce(text, pc.cast(ids, pa.string()))
            keys = [k if k is not None else "" for k in text.to_pylist()]
        raw: list | None = None
        bad = sorted(set().union(*(f.reasons for f in feats)))
        if bad:
            wanted = [c for c in self.input_columns() if c in batch.schema.names and c not in self.scoring.passthrough]
            rows = batch.select(wanted).take(pa.array(bad, pa.int64())).to_pylist()
            raw = [{}] * batch.num_rows
            for i, row in zip(bad, rows, strict=True):
                raw[i] = row
        if self.drift is not None:
            self.observe(self.primary.scorer.good_matrix(feats[0]))
        return Routed(batch.num_rows, ids, feats, keys, raw, absent=frozenset(absent))

    def observe(self, matrix: np.ndarray) -> None:
        """The drift hook: the primary's matrix of a batch's scorable rows (every mode's decoding calls it;
        OIP infer, which parses tensors itself, calls it for requests the primary answers)."""
        if self.drift is not None:
            self.drift.observe(self.primary.model, matrix)

    def score_table(self, batch: pa.RecordBatch | pa.Table, carry: dict[str, pa.Array] | None = None) -> Scored:
        """Score an Arrow batch the way batch mode does (passthrough columns carried, ``carry`` added)."""
        columns: dict[str, pa.Array | pa.ChunkedArray] = {c: batch.column(c) for c in self.scoring.passthrough}
        columns.update(carry or {})
        return self.finish(self.from_table(batch), columns)

    # -- routing and scoring ---------------------------------------------------------------------
    def plan(self, routed: Routed) -> list[Job]:
        """Which rows each version scores: served jobs (with their bad rows) first, then shadow jobs."""
        served = self.served
        n = routed.n
        if len(served) == 1:
            assignment = np.zeros(n, dtype=np.int64)
        else:
            assignment = sticky.assign(routed.keys, [v.name for v in served], self.effective_weights())
        jobs: list[Job] = []
        served_bad = np.zeros(n, dtype=bool)
        for i, v in enumerate(served):
            rows = np.arange(n) if len(served) == 1 else np.flatnonzero(assignment == i)
            if not rows.size:
                continue
            feats = routed.features[v.signature]
            sub = feats if rows.size == n else _subset(feats, rows)
            if sub.reasons:
                served_bad[rows[list(sub.reasons)]] = True
            jobs.append(Job(v, rows, sub))
        for v in self.shadows:
            feats = routed.features[v.signature]
            bad = served_bad.copy()
            if v.signature in routed.absent:
                bad[:] = True
            elif feats.reasons:
                bad[list(feats.reasons)] = True
            rows = np.flatnonzero(~bad)
            skipped = int(n - rows.size - np.count_nonzero(served_bad))
            if skipped:
                self.skipped[v.name] += skipped
                self.metrics.version_errors.labels(v.name).inc(skipped)
            if rows.size:
                jobs.append(Job(v, rows, Features(np.ascontiguousarray(feats.matrix[rows]), {})))
        return jobs

    def predict(self, job: Job, matrix: np.ndarray | None = None) -> np.ndarray | None:
        """Predictions of a job's good rows; None when a non-primary model failed (logged and counted).

        The primary's failures propagate: there is no version left to fall back to."""
        matrix = job.matrix() if matrix is None else matrix
        started = time.perf_counter()
        if job.version is self.primary:
            pred = job.version.model.predict(matrix)
        else:
            try:
                pred = job.version.model.predict(matrix)
            except Exception as exc:  # noqa: BLE001 - a broken canary or shadow must not stop the stream
                self.failed(job, matrix.shape[0], exc)
                return None
        self.metrics.version_seconds.labels(job.version.name).observe(time.perf_counter() - started)
        return pred

    def failed(self, job: Job, rows: int, exc: BaseException) -> None:
        log.error("predict failed", extra={"model_version": job.version.name, "reason": str(exc)[:300]})
        self.metrics.version_errors.labels(job.version.name).inc(rows)
        self.guards.errors(job.version, rows, rows)

    def fallback(self, routed: Routed, job: Job) -> Job:
        """The same rows, scored by the primary (a served canary failed)."""
        return Job(self.primary, job.rows, _subset(routed.features[self.primary.signature], job.rows))

    def finish(self, routed: Routed, carry: dict[str, pa.Array] | None = None,
               predictions: list[np.ndarray | None] | None = None, jobs: list[Job] | None = None) -> Scored:
        """Score a routed batch. ``predictions`` (per job of ``jobs``), when given, were computed elsewhere
        (serve mode's batcher; None for a job whose model failed); otherwise each job predicts here."""
        carry = carry or {}
        jobs = self.plan(routed) if jobs is None else jobs
        if predictions is None:
            predictions = [self.predict(job) for job in jobs]
        results, errors, error_rows = [], [], []
        no_errors = None  # an empty errors table of the right columns (from a served job)
        served_score = np.full(routed.n, np.nan)
        served_label = np.full(routed.n, -1, dtype=np.int64)
        served_version = np.full(routed.n, -1, dtype=np.int64)
        for job, pred in zip(jobs, predictions, strict=True):
            if pred is None:
                if job.version.shadow:
                    self.skipped[job.version.name] += int(job.rows.size)
                    continue
                job = self.fallback(routed, job)
                pred = self.predict(job)
            v = job.version
            full = job.rows.size == routed.n
            sub_carry = carry if full else {k: c.take(pa.array(job.rows)) for k, c in carry.items()}
            ids = routed.ids if full else routed.ids.take(pa.array(job.rows))
            raw = None
            if job.features.reasons and routed.raw is not None:
                raw = routed.raw if full else [routed.raw[int(r)] for r in job.rows]
            scored = v.scorer.finish(ids, job.features, sub_carry, raw, predictions=pred, served=not v.shadow)
            observe_version(self, job.version, scored)
            if len(jobs) == 1 and full:  # one version: its table is the batch's
                self.guards.check()
                return scored
            results.append(scored.results)
            if v.shadow:
                compare_shadow(self, job.version, job.rows, scored, served_score, served_label, served_version)
                continue
            if no_errors is None:
                no_errors = scored.errors.slice(0, 0)
            good = np.ones(job.rows.size, dtype=bool)
            good[scored.error_rows] = False
            good_rows = job.rows[good]
            served_score[good_rows] = scored.results["score"].to_numpy()
            served_version[good_rows] = self.versions.index(v)
            if v.model.multiclass:
                served_label[good_rows] = scored.results["label"].to_numpy()
            if scored.num_errors:
                errors.append(scored.errors)
                error_rows.append(job.rows[scored.error_rows])
        self.guards.check()
        if not results:  # only possible for an empty batch
            empty = self.primary.scorer.finish(routed.ids, routed.primary, carry, routed.raw,
                                               predictions=np.empty(0), served=True)
            return empty
        table = results[0] if len(results) == 1 else pa.concat_tables(results, promote_options="default")
        if not errors:
            return Scored(table, no_errors, np.empty(0, np.int64))
        err = errors[0] if len(errors) == 1 else pa.concat_tables(errors, promote_options="default")
        rows = error_rows[0] if len(error_rows) == 1 else np.concatenate(error_rows)
        return Scored(table, err, rows)
