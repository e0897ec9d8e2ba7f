"""Redis sink: results as one hash per record id, for low-latency lookups of a record's current score.

``redis://[[user]:password@]host[:port][/db]?prefix=scores:&ttl_s=SECONDS`` (``rediss://`` for TLS, with
``&ca_file=/path/ca.pem`` to verify the server against that CA). Defaults: port 6379, db 0, prefix ``scores:``, no
TTL. The password is a secret: percent-encode ``@ / ? #`` in it; it is never in ``name``, logs or errors. A bad
URI (port or db not a whole number, ttl_s not a positive whole number, an unknown query key, ca_file without
rediss:// or not a file, a ``#`` not written ``%23``) is a ``ConfigError`` naming the setting, before any
connection; a database the server does not have is one at ``check()``. An unreachable server
is a ``SinkError`` (retryable) at ``check()`` or the first write, with the redacted address.

Layout (``P`` is the prefix; every key of the sink starts with it, so two sinks on one database need prefixes
neither of which starts the other, e.g. ``scores:`` and ``shadow:``; read side as redis-cli commands):

    P{id}                 hash: field <model_version> -> JSON of that version's result row (id, score, label and
                          scores for multiclass, model_version, served, scored_at as ISO 8601 UTC, explanation,
                          passthrough values; stream/serve rows also topic, partition, offset, timestamp);
                          field ``served`` -> the model_version served for this id (set only by rows with
                          served=true: a shadow version never moves it)
    P_errors:{source}     hash: field <model_version> -> JSON of the rejected row (id, reason, raw as JSON,
                          model_version, scored_at, source, carried columns); source is ``file#row`` in batch mode
                          (``id:{id}`` when a mode gives none)
    P_ledger              hash: batch input (unit) -> JSON {fingerprint, rows, rejected, finished_at}
    P_units               hash: batch unit -> JSON {"versions": [...]}: the versions its results were written for
    P_unit:{unit}         set of the ids a batch unit wrote; P_unit_errors:{unit}: the error sources it wrote

    HGET scores:42 served                 -> "churn-v2"        the served version
    HGET scores:42 churn-v2               -> {"id":"42","score":0.91,...}
    HGETALL scores:42                     -> every version's row (shadows too) and the served pointer
    EVAL "return redis.call('HGET', KEYS[1], redis.call('HGET', KEYS[1], 'served'))" 1 scores:42   (one round trip)
    HGETALL scores:_errors:/data/day=1/part-0.parquet#17       HGET scores:_ledger /data/day=1/part-0.parquet

Choice: the served row is reached through the ``served`` pointer, not copied into a ``current`` field: one JSON per
(id, version) in memory, and writes measured 35% faster than with the copy. The pointer and the row it names are
written in one atomic script call, so a reader never sees a pointer to a row that is not there (a rewritten unit
deletes a pointer whose row it deleted). Ids are keys as text: text as is, binary as its bytes, other types as
Arrow casts them to text (``scorer.error_ids``), so ids 7 and "7" are one key. Rules and traps:

- Idempotent per (id, model_version): writing a row again sets the same field; a later write wins (within one
  call the later row is kept and counted in ``duplicates_collapsed``, as in the table sinks). As in the table
  sinks, a stream/serve row (``topic``, ``partition``, ``offset``) does not replace the stored row of its version
  when that one is from a later offset of the same topic-partition (a zombie worker's late write is skipped);
  across partitions the later write wins. Cost: one HGET per stream row, and a JSON decode when the row exists.
- A rejected record's error entry is not deleted by a later successful result of the same record (except when the
  mode says the result settles it, ``Scored.resolved``, as the serve mode does for a redelivered event): read the
  results, not the errors, for what was scored.
- Rows refused with ``RowsRejected`` before anything of the call is stored: a null or empty id, an id that names one
  of the sink's own keys (``_ledger``, ``_units``, or starting ``_unit:``, ``_unit_errors:``, ``_errors:``), a
  model version named ``served``. Every other value has a JSON form (``tables.json_default``, else its text).
- All or nothing per write: rows go to the server in scripts of ``CHUNK`` rows (one Lua ``EVAL`` each, which also
  sets the TTL and the unit's id sets), several chunks in one ``MULTI``/``EXEC``. Redis does not roll back: a key
  under the prefix holding another type (not the sink's) fails the write with a ``SinkError`` naming it after the
  rows before it were applied; remove that key (the retried write is idempotent). Not for Redis Cluster (a
  transaction over keys in many slots is refused there).
- Batch (``begin(unit)``): the writer keeps the unit's encoded rows in memory (about the JSON size of its rows: a
  file's results, not one batch, so batch memory grows with the file here, unlike other sinks) and ``commit``
  writes them in one transaction that first deletes what the unit wrote before (its versions' fields of its ids,
  a served pointer left dangling, its error keys, its sets), so a rewritten input leaves nothing stale. As in the
  table sinks, an id written by two inputs is deleted with the one rewritten last.
- TTL (``ttl_s``): ``EXPIRE`` on each result and error key (and the unit's sets) after every write: a key lives
  ttl_s after its last write. The ledger and ``P_units`` do not expire (Redis 7.0 cannot expire hash fields):
  after the results of an input expired, a rerun still skips it; delete its ledger field (``HDEL P_ledger unit``)
  or use a new prefix to score it again.
- Durability is the server's: a write returns when Redis has applied it in memory; it survives a Redis restart only
  with the persistence the operator configured (AOF with ``appendfsync always`` for every write, ``everysec``
  loses up to a second; the test server here keeps nothing on disk). The ledger lives in the same server, so a
  restart that loses results loses their ledger entries with them, and a rerun scores those inputs again.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable, Iterator
from urllib.parse import parse_qsl, unquote, urlparse

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import redis
import redis.exceptions
from redis.backoff import NoBackoff
from redis.retry import Retry

try:
    from hiredis import pack_command as _hiredis_pack_command

    _hiredis_pack: Callable[[tuple], bytes] | None = _hiredis_pack_command
except ImportError:  # pragma: no cover - hiredis comes with the redis[hiredis] dependency
    _hiredis_pack = None

from workers.errors import ConfigError, RowsRejected, SinkError
from workers.scoring.scorer import Scored, error_ids
from workers.settings import scrub
from workers.sinks.base import Ledger, Sink, UnitWriter, redact
from workers.sinks.rowjson import json_rows, plain_columns
from workers.sinks.tables import POSITION, dedupe_last, missing_keys, plain

RESULT_KEY = ("id", "model_version")
ERROR_KEY = ("source", "model_version")
QUERY_KEYS = {"prefix", "ttl_s", "ca_file"}
SERVED = "served"  # the pointer field; no model version may be named so
META = ("_ledger", "_units")  # ids that would name the sink's own keys...
META_PREFIXES = ("_unit:", "_unit_errors:", "_errors:")  # ...or start like them
CHUNK = 5000  # rows per script call: about 1 MB of arguments, a few ms of server time
_BINARY = (pa.types.is_binary, pa.types.is_large_binary, pa.types.is_fixed_size_binary)

# ARGV: ttl (0: none), prefix, errors prefix, ids set key ('' outside a unit), error sources set key, then per row
# key, field, JSON, kind (1 served result, 0 shadow result, e error; a stream row's kind goes on with
# |topic|partition|offset: it is skipped when the stored row of that version is from a later offset of the same
# topic-partition). pcall: a foreign key of another type is named.
_WRITE = """
local ttl, plen, elen, ids, errs = tonumber(ARGV[1]), #ARGV[2], #ARGV[3], ARGV[4], ARGV[5]
local sub, rpcall = string.sub, redis.pcall
local idl, errl = {}, {}
for i = 6, #ARGV, 4 do
  local k, f, kind = ARGV[i], ARGV[i + 1], ARGV[i + 3]
  local stale = false
  if #kind > 1 then
    local old = rpcall('HGET', k, f)
    if type(old) == 'string' then
      local t, p, o = string.match(kind, '^.|(.*)|(%-?%d+)|(%-?%d+)$')
      local ok, d = pcall(cjson.decode, old)
      stale = ok and type(d) == 'table' and d.topic == t and tostring(d.partition) == p
              and type(d.offset) == 'number' and d.offset > tonumber(o)
    end
    kind = sub(kind, 1, 1)
  end
  if not stale then
    local r
    if kind == '1' then r = rpcall('HSET', k, f, ARGV[i + 2], 'served', f)
    else r = rpcall('HSET', k, f, ARGV[i + 2]) end
    if type(r) == 'table' and r.err then return redis.error_reply(r.err .. ' (key ' .. k .. ')') end
    if ttl > 0 then redis.call('EXPIRE', k, ttl) end
    if kind == 'e' then errl[#errl + 1] = sub(k, elen + 1) else idl[#idl + 1] = sub(k, plen + 1) end
  end
end
for _, set in ipairs({{ids, idl}, {errs, errl}}) do
  if set[1] ~= '' and #set[2] > 0 then
    for s = 1, #set[2], 1000 do redis.call('SADD', set[1], unpack(set[2], s, math.min(s + 999, #set[2]))) end
    if ttl > 0 then redis.call('EXPIRE', set[1], ttl) end
  end
end
return 0
"""

# KEYS: units hash, ids set, error sources set; ARGV: unit, prefix, errors prefix. Deletes what the unit wrote.
_FORGET = """
local entry = redis.call('HGET', KEYS[1], ARGV[1])
local versions = entry and cjson.decode(entry).versions or {}
if #versions > 0 then
  for _, id in ipairs(redis.call('SMEMBERS', KEYS[2])) do
    local k = ARGV[2] .. id
    redis.call('HDEL', k, unpack(versions))
    local served = redis.call('HGET', k, 'served')
    if served and redis.call('HEXISTS', k, served) == 0 then redis.call('HDEL', k, 'served') end
  end
end
for _, source in ipairs(redis.call('SMEMBERS', KEYS[3])) do redis.call('DEL', ARGV[3] .. source) end
redis.call('DEL', KEYS[2], KEYS[3])
redis.call('HDEL', KEYS[1], ARGV[1])
return 0
"""


def _pack(conn: redis.Connection, command: list) -> list[bytes]:
    """The command in the Redis protocol: hiredis packs it in C (redis-py's own packer first walks the arguments
    in Python, 1.6 us per row here); without hiredis, redis-py's."""
    if _hiredis_pack is not None:
        return [_hiredis_pack(tuple(command))]
    return conn.pack_command(*command)


def _whole(value: str, setting: str, what: str, shown: str, low: int = 0, high: int | None = None) -> int:
    text = value.strip()
    if not (text.isascii() and text.isdigit()) or int(text) < low or (high is not None and int(text) > high):
        bound = f"from {low} to {high}" if high is not None else f"at least {low}"
        raise ConfigError(setting, f"{shown}: {what} must be a whole number {bound} (got {value!r})")
    return int(text)


class RedisTarget:
    """What a ``redis://`` / ``rediss://`` URI names, checked (ConfigError naming ``setting``) without connecting."""

    def __init__(self, uri: str, setting: str):
        if "#" in uri:  # urlparse would drop it and what follows as a fragment: another prefix, silently
            raise ConfigError(setting, "a '#' in a Redis URI starts a fragment, which would be dropped: write it "
                                       "as %23 (in the prefix or the password)")
        self.name = redact(uri)
        shown = self.name
        p = urlparse(uri)
        self.tls = p.scheme.lower() == "rediss"
        netloc = p.netloc.rsplit("@", 1)[-1]
        host, _, port = netloc.rpartition(":") if not netloc.endswith("]") else (netloc, "", "")
        if not host and port and not _:
            host, port = port, ""
        self.host = (host or "localhost").strip("[]")
        self.port = _whole(port, setting, "the port", shown, 1, 65535) if port else 6379
        db = p.path.strip("/")
        self.db = _whole(db, setting, "the database (the path after the port)", shown) if db else 0
        self.username = unquote(p.username) if p.username else None
        self.password = unquote(p.password) if p.password else None
        # A '+' is itself (form decoding would make it a space: another prefix, silently); %2B works too.
        pairs = parse_qsl(p.query.replace("+", "%2B"), keep_blank_values=True)
        unknown = sorted({k for k, _ in pairs} - QUERY_KEYS)
        if unknown:
            raise ConfigError(setting, f"{shown}: unknown query key(s) {', '.join(map(repr, unknown))}; "
                                       f"use {', '.join(sorted(QUERY_KEYS))}")
        seen = [k for k, _ in pairs]
        twice = sorted({k for k in seen if seen.count(k) > 1})
        if twice:
            raise ConfigError(setting, f"{shown}: {', '.join(twice)} given more than once")
        query = dict(pairs)
        self.prefix = query.get("prefix", "scores:")
        self.ttl_s = _whole(query["ttl_s"], setting, "ttl_s (seconds)", shown, 1) if "ttl_s" in query else 0
        self.ca_file = query.get("ca_file") or None
        if self.ca_file and not self.tls:
            raise ConfigError(setting, f"{shown}: ca_file is for TLS: use rediss://")
        if self.ca_file and not os.path.isfile(self.ca_file):
            raise ConfigError(setting, f"{shown}: ca_file {self.ca_file!r} is not a file")
        self.address = f"{'rediss' if self.tls else 'redis'}://{self.host}:{self.port}/{self.db}"

    def client(self) -> redis.Redis:
        tls: dict[str, object] = {"ssl": True, "ssl_ca_certs": self.ca_file} if self.tls else {}
        return redis.Redis(host=self.host, port=self.port, db=self.db, username=self.username,
                           password=self.password, socket_connect_timeout=5, socket_timeout=120,
                           retry=Retry(NoBackoff(), 0), **tls)  # type: ignore[arg-type]  # the caller retries


def _key_texts(col: pa.ChunkedArray) -> list[bytes | None]:
    """Each id as the bytes of its key (without the prefix): text as UTF-8, binary as is, others as text."""
    col = plain(col)
    t = col.type
    if any(f(t) for f in _BINARY):
        return [None if v is None else bytes(v) for v in col.to_pylist()]
    texts = col if pa.types.is_string(t) or pa.types.is_large_string(t) else error_ids(col)
    return [None if v is None else v.encode() for v in texts.to_pylist()]


def _bad_ids(keys: list[bytes | None]) -> dict[int, str]:
    bad: dict[int, str] = {}
    for i, k in enumerate(keys):
        if k is None:
            bad[i] = "id is missing (null); rows are stored by (id, model_version)"
        elif not k:
            bad[i] = "id is empty: the Redis key would be the prefix alone"
        elif k[:1] == b"_" and (k.decode("utf-8", "replace") in META
                                or k.decode("utf-8", "replace").startswith(META_PREFIXES)):
            bad[i] = (f"id {k.decode('utf-8', 'replace')!r} names one of the Redis sink's own keys "
                      f"({', '.join(META)}, {', '.join(p + '*' for p in META_PREFIXES)})")
    return bad


class _Encoded:
    """A write's rows as script arguments: (key, field, JSON, kind) flattened, and the versions of its results."""

    def __init__(self) -> None:
        self.args: list[bytes | str] = []
        self.versions: set[str] = set()
        self.settle: list[list] = []  # HDEL of error entries these results settle (Scored.resolved)
        self.rows = 0

    def scripts(self, head: list) -> Iterator[list]:
        """The script calls writing these rows, ``CHUNK`` rows each; ``head`` is the EVAL and its fixed ARGV."""
        step = CHUNK * 4
        for start in range(0, len(self.args), step):
            yield [*head, *self.args[start:start + step]]


class _Unit(UnitWriter):
    """One batch unit: rows encoded as they come, written at ``commit`` in one transaction after its old rows go."""

    def __init__(self, sink: RedisSink, unit: str):
        self.sink, self.unit = sink, unit
        self.encoded = _Encoded()
        self.collapsed = 0

    def write(self, scored: Scored) -> None:
        self.collapsed += self.sink._encode(scored, self.encoded)

    def commit(self) -> None:
        self.sink._commit_unit(self.unit, self.encoded)
        self.sink.duplicates_collapsed += self.collapsed
        self.encoded = _Encoded()

    def abort(self) -> None:
        self.encoded = _Encoded()


class RedisSink(Sink):
    """See the module docstring (a third of this module: the key layout is the contract readers rely on)."""

    def __init__(self, uri: str, setting: str):
        self.target = RedisTarget(uri, setting)
        self.setting = setting
        self.name = self.target.name
        self._uri = uri  # for scrub(): driver messages may quote what they could not use
        self.prefix = self.target.prefix.encode()
        self.errors_prefix = self.prefix + b"_errors:"
        self._client: redis.Redis | None = None
        self._inputs = RedisLedger(self)

    @property
    def client(self) -> redis.Redis:
        if self._client is None:
            self._client = self.target.client()
        return self._client

    def _key(self, name: str) -> bytes:
        return self.prefix + name.encode()

    def _fail(self, what: str, exc: Exception) -> SinkError:
        return SinkError(scrub(f"{what} {self.name}: {exc}", self._uri))

    # -- encoding (no I/O) ---------------------------------------------------------------------------
    def _encode(self, scored: Scored, into: _Encoded) -> int:
        """Add the results and errors of ``scored`` to ``into``; RowsRejected (nothing added) for rows that
        cannot be keyed. Returns how many duplicate rows were collapsed."""
        results = plain_columns(scored).results
        bad: dict[int, str] = {}
        keys: list[bytes | None] = []
        versions: list[str] = []
        if results.num_rows:
            bad = missing_keys(results, ("model_version",))
            keys = _key_texts(results.column("id"))
            for i, reason in _bad_ids(keys).items():
                bad.setdefault(i, reason)
            versions = results.column("model_version").to_pylist()
            for i, v in enumerate(versions):
                if v == SERVED:
                    bad.setdefault(i, f"model version {SERVED!r} is the Redis sink's served-pointer field: "
                                      "rename the version")
        if bad:
            raise RowsRejected(bad)
        collapsed = 0
        if results.num_rows:
            deduped = results
            if len(set(zip(keys, versions, strict=True))) < len(keys):  # distinct keys: distinct ids, none to collapse
                deduped, keep = dedupe_last(results, RESULT_KEY)
                if keep is not None:
                    collapsed = results.num_rows - deduped.num_rows
                    keys = [keys[i] for i in keep]
                    versions = [versions[i] for i in keep]
            n = deduped.num_rows
            served_col = deduped.column("served") if "served" in deduped.column_names else None
            served = [b"1" if s else b"0" for s in pc.fill_null(served_col, False).to_pylist()] \
                if served_col is not None else [b"1"] * n
            if all(c in deduped.column_names for c in POSITION):  # stream/serve rows: never over a later offset
                positions = zip(*(deduped.column(c).to_pylist() for c in POSITION), strict=True)
                served = [kind if None in where else b"%s|%s|%d|%d" % (kind, str(where[0]).encode(), *where[1:])
                          for kind, where in zip(served, positions, strict=True)]
            prefix = self.prefix
            rows: list = [None] * (4 * n)  # (key, field, JSON, kind) per row, interleaved by slice assignment
            rows[0::4] = [prefix + k for k in keys]  # type: ignore[operator]  # None was refused above
            rows[1::4] = versions
            rows[2::4] = json_rows(deduped)
            rows[3::4] = served
            into.args += rows
            into.versions.update(versions)
            into.rows += n
        self._encode_errors(scored.errors, into)
        into.settle += [["HDEL", self.errors_prefix + source.encode(), version] for source, version in scored.resolved]
        return collapsed

    def _encode_errors(self, errors: pa.Table, into: _Encoded) -> None:
        if not errors.num_rows:
            return
        if "source" not in errors.column_names:
            ids = errors.column("id").to_pylist() if "id" in errors.column_names else [None] * errors.num_rows
            errors = errors.append_column("source", pa.array([f"id:{i}" for i in ids], pa.string()))
        errors, _ = dedupe_last(errors, ERROR_KEY)
        sources = errors.column("source").to_pylist()
        versions = (errors.column("model_version").to_pylist() if "model_version" in errors.column_names
                    else [""] * errors.num_rows)
        for source, version, body in zip(sources, versions, json_rows(errors, ("raw",)), strict=True):
            into.args += (self.errors_prefix + str(source).encode(), version or "", body, b"e")

    # -- writing -------------------------------------------------------------------------------------
    def _script_head(self, ids: bytes = b"", errs: bytes = b"") -> list:
        return ["EVAL", _WRITE, 0, self.target.ttl_s, self.prefix, self.errors_prefix, ids, errs]

    def _transaction(self, commands: list[list]) -> None:
        """Run ``commands`` atomically: one alone, several in MULTI/EXEC, each packed just before it is sent.
        Raises SinkError (retryable) on any failure; a command's error reply names what failed."""
        if not commands:
            return
        pool = self.client.connection_pool
        try:
            conn = pool.get_connection()
        except (redis.exceptions.RedisError, OSError) as exc:
            raise self._fail("cannot reach", exc) from None
        try:
            if len(commands) == 1:
                conn.send_packed_command(_pack(conn, commands[0]), check_health=False)
                conn.read_response()
                return
            conn.send_command("MULTI", check_health=False)
            conn.read_response()
            for command in commands:  # pipelined: the server parses one while the next is packed
                conn.send_packed_command(_pack(conn, command), check_health=False)
            conn.send_command("EXEC", check_health=False)
            queued_error = None
            for _ in commands:  # QUEUED each, or the error that makes EXEC abort
                try:
                    conn.read_response()
                except redis.exceptions.ResponseError as exc:
                    queued_error = queued_error or exc
            try:
                replies = conn.read_response()
            except redis.exceptions.ResponseError:
                if queued_error is not None:
                    raise queued_error from None
                raise
            failed = [r for r in replies or [] if isinstance(r, redis.exceptions.ResponseError)]
            if failed:
                raise failed[0]
        except redis.exceptions.ResponseError as exc:
            conn.disconnect()  # an aborted MULTI must not be left open on a pooled connection
            raise self._fail("writing to", exc) from None
        except (redis.exceptions.RedisError, OSError) as exc:
            conn.disconnect()
            raise self._fail("writing to", exc) from None
        except BaseException:
            conn.disconnect()
            raise
        finally:
            pool.release(conn)

    def write_batch(self, scored: Scored) -> None:
        """Store one micro-batch (stream, serve): one script call, or one transaction of several."""
        encoded = _Encoded()
        collapsed = self._encode(scored, encoded)
        self._transaction([*encoded.settle, *encoded.scripts(self._script_head())])
        self.duplicates_collapsed += collapsed

    def begin(self, unit: str) -> UnitWriter:
        return _Unit(self, unit)

    def _commit_unit(self, unit: str, encoded: _Encoded) -> None:
        units, ids, errs = self._key("_units"), self._key(f"_unit:{unit}"), self._key(f"_unit_errors:{unit}")
        commands: list[list] = [["EVAL", _FORGET, 3, units, ids, errs, unit, self.prefix, self.errors_prefix]]
        commands += encoded.settle
        commands += encoded.scripts(self._script_head(ids, errs))
        if encoded.versions:
            commands.append(["HSET", units, unit, orjson.dumps({"versions": sorted(encoded.versions)})])
        self._transaction(commands)

    # -- ledger ----------------------------------------------------------------------------------------
    def ledger(self) -> Ledger:
        """The batch ledger, in hash ``{prefix}_ledger`` of the same server."""
        return self._inputs

    def check(self) -> None:
        try:
            self.client.ping()
        except redis.exceptions.ResponseError as exc:
            if "DB index is out of range" in str(exc):  # a wrong setting: no rerun can help
                raise ConfigError(self.setting, f"{self.name}: the server has no database {self.target.db} (its "
                                                "`databases` setting bounds them; the default is 0 to 15)") from None
            raise self._fail("cannot reach", exc) from None
        except (redis.exceptions.RedisError, OSError) as exc:
            raise self._fail("cannot reach", exc) from None

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client.connection_pool.disconnect()
            self._client = None


class RedisLedger(Ledger):
    """The batch ledger of a ``RedisSink``: hash ``{prefix}_ledger``, unit -> JSON {fingerprint, rows, rejected,
    finished_at}, on the sink's client."""

    def __init__(self, sink: RedisSink):
        self.sink = sink

    def done(self, unit: str) -> str | None:
        try:
            entry = self.sink.client.hget(self.sink._key("_ledger"), unit)
        except (redis.exceptions.RedisError, OSError) as exc:
            raise self.sink._fail("reading the ledger of", exc) from None
        if entry is None:
            return None
        try:
            return str(orjson.loads(entry)["fingerprint"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return None  # not ours: score the input again, which rewrites the entry

    def mark_done(self, unit: str, fingerprint: str, rows: int, rejected: int) -> None:
        entry = orjson.dumps({"fingerprint": fingerprint, "rows": rows, "rejected": rejected,
                              "finished_at": dt.datetime.now(dt.UTC).isoformat()})
        try:
            self.sink.client.hset(self.sink._key("_ledger"), unit, entry)
        except (redis.exceptions.RedisError, OSError) as exc:
            raise self.sink._fail("recording an input as done in", exc) from None
