"""``scoring-worker report``: one self-contained HTML page (or SVG picture) people look at.

From a results table or dataset (any sink ``compare`` reads): score distributions per model version overlaid,
rows and quantiles per version, shadow agreement; with a reference profile and the scored inputs, drift per
feature (PSI, null share, share outside the reference range). Charts are inline SVG: no JavaScript, no
network, nothing to install; the page opens anywhere and can be attached to a ticket.
"""

from __future__ import annotations

import datetime as dt
import html

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
W, PAD = 760, 48


def _esc(x: object) -> str:
    return html.escape(str(x), quote=True)


def _fmt(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def histogram_svg(report: dict, y0: int = 0) -> tuple[str, int]:
    """Overlaid score distributions (share of each version's rows per bin), one step line per version."""
    edges = report["edges"]
    versions = report["versions"]
    legend = 16 * len(versions) + 10
    h = 240 + legend
    shares = [[c / max(sum(v["histogram"]), 1) for c in v["histogram"]] for v in versions]
    top = max((max(s) for s in shares if s), default=1.0) or 1.0
    x = lambda e: PAD + (e - edges[0]) / ((edges[-1] - edges[0]) or 1) * (W - 2 * PAD)  # noqa: E731
    y = lambda s: y0 + h - 30 - s / top * (h - 50 - legend)  # noqa: E731
    out = [f'<text x="{PAD}" y="{y0 + 18}" font-size="15" font-weight="bold">Score distribution by model version '
           f'(share of rows per bin)</text>',
           f'<line x1="{PAD}" y1="{y(0)}" x2="{W - PAD}" y2="{y(0)}" stroke="#888"/>']
    for e in (edges[0], (edges[0] + edges[-1]) / 2, edges[-1]):
        out.append(f'<text x="{x(e):.1f}" y="{y(0) + 16}" font-size="11" text-anchor="middle">{e:.3g}</text>')
    t = report["threshold"]
    if edges[0] <= t <= edges[-1]:
        out.append(f'<line x1="{x(t):.1f}" y1="{y(top):.1f}" x2="{x(t):.1f}" y2="{y(0)}" stroke="#999" '
                   f'stroke-dasharray="4 3"/><text x="{x(t) + 4:.1f}" y="{y(top) + 10:.1f}" font-size="11">'
                   f'threshold {t}</text>')
    for i, (v, s) in enumerate(zip(versions, shares, strict=True)):
        color = COLORS[i % len(COLORS)]
        pts = []
        for j, share in enumerate(s):
            pts += [f"{x(edges[j]):.1f},{y(share):.1f}", f"{x(edges[j + 1]):.1f},{y(share):.1f}"]
        dash = ' stroke-dasharray="6 3"' if v["served_rows"] == 0 else ""
        out.append(f'<polyline fill="none" stroke="{color}" stroke-width="2"{dash} points="{" ".join(pts)}">'
                   f'<title>{_esc(v["version"])}</title></polyline>')
        role = "shadow" if v["served_rows"] == 0 else "served"
        ly = y0 + 38 + 16 * i
        out.append(f'<rect x="{PAD}" y="{ly - 5}" width="16" height="3" fill="{color}"/>'
                   f'<text x="{PAD + 22}" y="{ly}" font-size="12">{_esc(v["version"])} ({role}, '
                   f'{v["served_rows"] + v["shadow_rows"]:,} rows, mean {_fmt(v["mean"], 3)})</text>')
    return "\n".join(out), h


def bars_svg(title: str, items: list[tuple[str, float, str]], y0: int, limits: tuple[float, ...] = (),
             fmt: str = "{:.3f}") -> tuple[str, int]:
    """Horizontal bars: (label, value, color); dashed lines at ``limits``."""
    row = 18
    h = 40 + row * len(items)
    top = max([v for _, v, _ in items] + list(limits) + [1e-9])
    left = PAD + 170
    x = lambda v: left + v / top * (W - PAD - left - 60)  # noqa: E731
    out = [f'<text x="{PAD}" y="{y0 + 18}" font-size="15" font-weight="bold">{_esc(title)}</text>']
    for k, (label, value, color) in enumerate(items):
        yy = y0 + 30 + k * row
        out.append(f'<text x="{left - 6}" y="{yy + 12}" font-size="11" text-anchor="end">{_esc(label)}</text>'
                   f'<rect x="{left}" y="{yy + 2}" width="{max(x(value) - left, 1):.1f}" height="{row - 5}" '
                   f'fill="{color}"/><text x="{x(value) + 4:.1f}" y="{yy + 12}" font-size="11">'
                   f'{fmt.format(value)}</text>')
    for lim in limits:
        out.append(f'<line x1="{x(lim):.1f}" y1="{y0 + 26}" x2="{x(lim):.1f}" y2="{y0 + h - 6}" stroke="#999" '
                   f'stroke-dasharray="4 3"/><text x="{x(lim) + 2:.1f}" y="{y0 + h + 4}" font-size="10">{lim}</text>')
    return "\n".join(out), h + 10


def picture(report: dict, drift: dict | None) -> str:
    """Every chart of the report as one SVG document."""
    parts, y = [], 10
    svg, h = histogram_svg(report, y)
    parts.append(svg)
    y += h + 10
    if report["shadow"]:
        items = [(f'{p["version"]} vs {p["baseline"]}', p["agreement"] or 0.0, "#2ca02c") for p in report["shadow"]]
        svg, h = bars_svg(f"Shadow agreement (same side of {report['threshold']})", items, y, (0.9,), "{:.1%}")
        parts.append(svg)
        y += h + 10
    if drift:
        items = [(f, d["psi"], "#d62728" if d["psi"] > 0.2 else "#ff7f0e" if d["psi"] > 0.1 else "#1f77b4")
                 for f, d in sorted(drift.items(), key=lambda kv: -kv[1]["psi"])]
        svg, h = bars_svg("Drift per feature (PSI against the reference profile)", items, y, (0.1, 0.2))
        parts.append(svg)
        y += h + 10
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{y}" viewBox="0 0 {W} {y}" '
            f'font-family="Helvetica, Arial, sans-serif"><rect width="100%" height="100%" fill="white"/>'
            + "\n".join(parts) + "</svg>")


def page(report: dict, drift: dict | None, source: str) -> str:
    rows = "".join(
        f"<tr><td>{_esc(v['version'])}</td><td>{v['served_rows']:,}</td><td>{v['shadow_rows']:,}</td>"
        f"<td>{_fmt(v['mean'])}</td><td>{_fmt(v['p50'])}</td><td>{_fmt(v['p90'])}</td><td>{_fmt(v['p99'])}</td>"
        f"<td>{_fmt(v['at_or_above_threshold'])}</td></tr>" for v in report["versions"])
    shadow = "".join(
        f"<tr><td>{_esc(p['version'])}</td><td>{_esc(p['baseline'])}</td><td>{p['pairs']:,}</td>"
        f"<td>{_fmt(p['agreement'])}</td><td>{_fmt(p['mean_abs_diff'])}</td><td>{_fmt(p['max_abs_diff'])}</td></tr>"
        for p in report["shadow"]) or '<tr><td colspan="6">no shadow rows</td></tr>'
    drift_rows = "".join(
        f"<tr><td>{_esc(f)}</td><td>{_fmt(d['psi'])}</td><td>{_fmt(d['null_share'])}</td>"
        f"<td>{_fmt(d['out_of_range_share'])}</td></tr>"
        for f, d in sorted((drift or {}).items(), key=lambda kv: -kv[1]["psi"]))
    drift_table = (f"<h2>Drift per feature</h2><table><tr><th>feature</th><th>PSI</th><th>null share</th>"
                   f"<th>outside reference range</th></tr>{drift_rows}</table>") if drift else \
        "<p>No drift section: pass <code>--profile</code> and <code>--data</code>.</p>"
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Scoring report</title>
<style>body{{font-family:Helvetica,Arial,sans-serif;margin:24px;color:#222}}table{{border-collapse:collapse;
margin:8px 0 20px}}td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}td:first-child,th:first-child
{{text-align:left}}</style></head><body>
<h1>Scoring report</h1>
<p>{report['rows']:,} result rows from <code>{_esc(source)}</code>; threshold {report['threshold']}; made {now}.</p>
{picture(report, drift)}
<h2>Versions</h2><table><tr><th>version</th><th>served rows</th><th>shadow rows</th><th>mean</th><th>p50</th>
<th>p90</th><th>p99</th><th>share &ge; threshold</th></tr>{rows}</table>
<h2>Shadow agreement</h2><table><tr><th>shadow</th><th>vs served</th><th>pairs</th><th>agreement</th>
<th>mean |diff|</th><th>max |diff|</th></tr>{shadow}</table>
{drift_table}
</body></html>
"""


def drift_of(settings, data: str, profile: str) -> dict:
    """Drift per feature of the scored inputs against a profile, read through the (primary) model's features,
    as the workers see them (categories as the model's codes)."""
    from workers.errors import ConfigError
    from workers.scoring.build import build_router
    from workers.scoring.drift import DriftMonitor, feature_batches

    primary = build_router(settings).primary
    try:
        monitor = DriftMonitor.from_file(profile, primary.model.feature_names, window=2**62)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
        # Any of these is the file's fault (not JSON, not a profile, a profile of other features).
        raise ConfigError("--profile", f"cannot use {profile} as a profile from `profile`: "
                                       f"{type(exc).__name__}: {exc}") from None
    for matrix in feature_batches(primary.scorer, data, settings.s3)[1]:
        monitor.observe(matrix)
    return monitor.report()


def write_report(settings, results: str, out: str, threshold: float | None, since: str | None,
                 profile_path: str | None, data: str | None) -> None:
    """``scoring-worker report``: the page (``out`` ending .html) or its charts (.svg) from ``results``, with drift
    when both ``profile_path`` and ``data`` are given (one without the other is a ConfigError, before any read);
    ``threshold`` None is SCORING_ROUTING__THRESHOLD's."""
    import click

    from workers.errors import ConfigError
    from workers.settings import redact
    from workers.tools.compare import compare, parse_since, read_results
    from workers.tools.files import as_data, output_file, write_text

    if bool(profile_path) != bool(data):
        raise ConfigError("--profile" if data else "--data", "--profile and --data go together")
    output_file(out)
    table = read_results(results, settings.s3, parse_since(since) if since else None, settings.iceberg)
    summary = compare(table, settings.routing.threshold if threshold is None else threshold)
    drift = as_data(lambda: drift_of(settings, data, profile_path)) if profile_path and data else None
    text = picture(summary, drift) if out.endswith(".svg") else page(summary, drift, redact(results))
    write_text(out, text)
    click.echo(f"wrote {out}: {summary['rows']:,} rows, {len(summary['versions'])} version(s)"
               f"{f', drift for {len(drift)} features' if drift else ''}")
