"""``scoring-worker settings``: every setting as a Markdown table (the README's reference, `make readme`), or
with --env the settings in effect as KEY=VALUE lines for deploy/<mode>/*.env.

Trap: secrets never appear: SecretStr fields are left out of the env lines, and a password inside a URI is
shown as ``***`` (with a note on stderr to keep the real URI in a Secret).
"""

from __future__ import annotations

import click

from workers.settings import Settings, env_lines, reference_rows


def print_settings(settings: Settings, as_env: bool) -> None:
    if as_env:
        lines = env_lines(settings)
        for line in lines:
            click.echo(line)
        if any(":***@" in line or "=***" in line.split("=", 1)[1] for line in lines):
            click.echo("note: passwords inside URIs are shown as ***: keep the real URI in a Secret, not in the "
                       "ConfigMap", err=True)
        return
    click.echo("| env var | default | meaning |\n|---|---|---|")
    for name, default, text in reference_rows():
        click.echo(f"| `{name}` | {f'`{default}`' if default else ''} | {text.replace('|', '/')} |")
