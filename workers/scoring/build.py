"""``build_router``: the one way every command (batch, batch-queue, check, stream, serve, report, profile) gets
the router it scores through."""

from __future__ import annotations

from workers.observability import Metrics
from workers.scoring.drift import DriftHook
from workers.scoring.guard import GuardBook
from workers.scoring.model import Model, load_model
from workers.scoring.router import Router
from workers.scoring.routing_spec import read_routing
from workers.settings import Settings


def build_router(settings: Settings, metrics: Metrics | None = None, guards: GuardBook | None = None,
                 model: Model | None = None, drift: DriftHook | None = None,
                 drift_window: int | None = None) -> Router:
    """The routing file's versions when ``SCORING_ROUTING__PATH`` is set, else a router of one version: the
    ``model`` given (already loaded, e.g. by a test or the demo) or the one ``SCORING_MODEL__*`` names.
    The drift hook (``SCORING_SCORING__PROFILE``) is ``drift`` when given (a reload keeps its window), else
    a new one over ``drift_window`` records (default ``SCORING_SCORING__DRIFT_WINDOW``). Raises ConfigError
    (one line naming the setting) when a file cannot be read, loaded or verified."""
    s = settings
    if s.routing.path and model is None:
        spec, digest = read_routing(s.routing.path)
        router = Router.from_spec(spec, digest, s.model, s.s3, s.scoring, s.routing.threshold, s.routing.path,
                                  metrics, guards, mlflow=s.mlflow)
    else:
        router = Router.single(model or load_model(s.model, s.s3, s.mlflow), s.scoring, metrics, guards)
    router.drift = drift if drift is not None else DriftHook.from_settings(s, router.metrics, router.primary.model,
                                                                               drift_window)
    return router
