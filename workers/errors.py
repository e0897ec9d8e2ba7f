"""One root error type and its kinds.

- ``ConfigError``: a setting is wrong; start-up stops with one line naming it (exit 2).
- ``ModelError``: the model file cannot be used (missing, a pickle, a wrong SHA-256, unparsable).
- ``InputError``: one input (a file) cannot be scored as a whole; the other inputs go on.
- ``SinkError``: the store failed; the caller retries and must not commit offsets meanwhile.
Bad *records* are not exceptions: they are data (a row in the errors output, a dead letter).
"""


class ScoringError(Exception):
    """Root of every error this package raises on purpose."""


class ConfigError(ScoringError):
    def __init__(self, setting: str, message: str):
        self.setting = setting
        super().__init__(f"{setting}: {message}")


class ModelError(ConfigError):
    """The model (a setting) cannot be loaded; names the setting like any config error."""


class InputError(ScoringError):
    """One input unit (a file) cannot be scored; others continue."""


class SinkError(ScoringError):
    """Writing to the store failed. Retryable: offsets stay uncommitted."""
