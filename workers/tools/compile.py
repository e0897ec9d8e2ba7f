"""``scoring-worker compile``: compile the model (with --routing, every version's) with lleaves into the cache,
e.g. in an init container or at image build, so workers load it instead of compiling at every start.

A model lleaves cannot compile is one error line (after load_model's warning saying why) and exit 1; the
others are still compiled.
"""

from __future__ import annotations

import click

from workers.settings import Settings


def compile_models(settings: Settings) -> int:
    """Compile every wanted model; the exit code (1 when any could not be compiled)."""
    from workers.scoring.model import load_model

    wanted = [settings.model]
    if settings.routing.path:
        from workers.scoring.routing_spec import read_routing

        spec, _ = read_routing(settings.routing.path)
        wanted = [settings.model.model_copy(update={"path": v.model, "sha256": v.sha256, "version": v.name})
                  for v in spec.versions]
    failed = 0
    for model_settings in wanted:
        model = load_model(model_settings.model_copy(update={"backend": "lleaves"}), settings.s3, settings.mlflow)
        if model.backend != "lleaves":
            click.echo(f"error: could not compile {model.source} with lleaves (see the warning above)", err=True)
            failed += 1
            continue
        click.echo(f"compiled {model.source} ({model.version}) into {settings.model.cache_dir}")
    return 1 if failed else 0
