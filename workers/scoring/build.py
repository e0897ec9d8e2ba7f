"""``build_router``: the one way every command (batch, batch-queue, check, stream, serve, report, profile) gets
the router it scores through."""

from __future__ import annotations

from workers.scoring.guard import GuardBook
from workers.scoring.model import Model, load_model
from workers.scoring.router import Router
from workers.scoring.routing_spec import read_routing
from workers.settings import Settings


def build_router(settings: Settings, metrics=None, guards: GuardBook | None = None,
                 model: Model | None = None) -> Router:
    """The routing file's versions when ``SCORING_ROUTING__PATH`` is set, else a router of one version: the
    ``model`` given (already loaded, e.g. by a test or the demo) or the one ``SCORING_MODEL__*`` names.
    Raises ConfigError (one line naming the setting) when a file cannot be read, loaded or verified."""
    s = settings
    if s.routing.path and model is None:
        spec, digest = read_routing(s.routing.path)
        return Router.from_spec(spec, digest, s.model, s.s3, s.scoring, s.routing.threshold, s.routing.path,
                                metrics, guards)
    return Router.single(model or load_model(s.model, s.s3), s.scoring, metrics, guards)
