"""One root error type and its kinds.

- ``ConfigError``: a setting is wrong; start-up stops with one line naming it (exit 2).
- ``ModelError``: the model file cannot be used (missing, a pickle, a wrong SHA-256, unparsable).
- ``InputError``: one input (a file) cannot be scored as a whole; the other inputs go on.
- ``SinkError``: the store failed; the caller retries and must not commit offsets meanwhile.
- ``RequestError``: an HTTP or gRPC request cannot be answered as asked; carries its status (``BadRequest`` 400,
  ``NotFound`` 404, ``TooLarge`` 413, ``Unavailable`` 503).
Bad *records* are not exceptions: they are data (a row in the errors output, a dead letter).
"""


class ScoringError(Exception):
    """Root of every error this package raises on purpose."""


class ConfigError(ScoringError):
    """``setting`` (the environment variable or option to fix) and ``reason`` (why), printed as one line."""

    def __init__(self, setting: str, reason: str):
        self.setting = setting
        self.reason = reason
        super().__init__(f"{setting}: {reason}")


class ModelError(ConfigError):
    """The model (a setting) cannot be loaded; names the setting like any config error."""


class InputError(ScoringError):
    """One input unit (a file) cannot be scored; others continue."""


class SinkError(ScoringError):
    """Writing to the store failed. Retryable: offsets stay uncommitted."""


class RowsRejected(ScoringError):
    """The store cannot hold some rows of a batch as they are (a value its column type cannot take, a
    number out of the column's range, a text too long for a key...). This is the *rows'* fault, not the
    store's: retrying cannot help, so callers must not treat it like ``SinkError``.

    Contract for sinks: raised by ``write_unit``/``write_batch``/``UnitWriter.write`` *before any row of that
    call is stored* (a transaction rolled back counts as not stored). ``rows`` maps a row index of
    ``scored.results`` to the reason (one line, names the column). What callers do with it:
    - stream: dead-letter those records with the reason (the result rows carry topic/partition/offset),
      then write the remaining rows again; the partition moves on.
    - serve: answer those events/requests with the reason; store and answer the rest.
    - batch: the input file fails alone with the first reasons (``InputError``); other files go on.
    """

    def __init__(self, rows: dict[int, str]):
        self.rows = dict(rows)
        first = next(iter(self.rows.items()), (None, "no rows"))
        more = f" (and {len(self.rows) - 1} more)" if len(self.rows) > 1 else ""
        super().__init__(f"row {first[0]}: {first[1]}{more}")


class RequestError(ScoringError):
    """A request (HTTP or gRPC) that cannot be answered as asked; ``status`` is the HTTP status to answer with
    (a gRPC front end maps it to its code). The message is safe to show the caller."""

    status = 500

    def __init__(self, message: str, status: int | None = None):
        if status is not None:
            self.status = status
        self.message = message
        super().__init__(message)


class BadRequest(RequestError, ValueError):
    """The request is malformed: a 400 with this message."""

    status = 400


class NotFound(RequestError):
    """No such model or version: a 404 (gRPC: NOT_FOUND)."""

    status = 404


class TooLarge(RequestError):
    """The request is over a size limit: a 413 (gRPC: RESOURCE_EXHAUSTED)."""

    status = 413


class Unavailable(RequestError):
    """Not the caller's fault and worth retrying later (the sink failed, the server is stopping): a 503 (gRPC:
    UNAVAILABLE)."""

    status = 503
