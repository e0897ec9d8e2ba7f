"""`scoring-worker report` from a real PostgreSQL results table written by a routed batch run."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import pytest

from tests import helpers
from tests.test_rollout import ab_with_shadow

pytestmark = pytest.mark.postgres


class Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.text: list[str] = []
        self.tags: dict[str, int] = {}
        self.polylines: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags[tag] = self.tags.get(tag, 0) + 1
        if tag == "polyline":
            self.polylines.append(dict(attrs)["points"])

    def handle_data(self, data):
        if data.strip():
            self.text.append(data.strip())


def run(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "workers", *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_report_from_a_postgres_results_table_names_every_version(models, pg_dsn, pg_table, tmp_path):
    inputs, routing = ab_with_shadow(models, tmp_path, files=2, rows=2500,
                                     names=("champion", "challenger", "shadow-x"), weights=(70, 30))
    results = f"{pg_dsn}?table={pg_table}"
    run("batch", "--routing", routing, "--input", str(inputs), "--output", results)
    profile = tmp_path / "profile.json"
    run("profile", "--model", models["binary"], "--data", str(inputs), "--output", str(profile))
    page_path = tmp_path / "report.html"
    out = run("report", "--routing", routing, "--results", results, "--output", str(page_path),
              "--profile", str(profile), "--data", str(inputs))
    assert "10,000 rows, 3 version(s), drift for 8 features" in out
    html = page_path.read_text()
    page = Page()
    page.feed(html)
    text = " ".join(page.text)
    assert page.tags.get("svg") == 1 and len(page.polylines) == 3
    assert all(len(p.split()) == 40 for p in page.polylines)  # 20 bins, two points each
    for version in ("champion", "challenger", "shadow-x"):
        assert text.count(version) >= 2, version  # in the chart legend and the tables
    for feature in helpers.FEATURES:
        assert feature in text
    # The page's numbers are compare's numbers.
    report = json.loads(run("compare", "--results", results, "--json"))
    agreement = {(p["version"], p["baseline"]): p["agreement"] for p in report["shadow"]}
    assert agreement[("shadow-x", "challenger")] == 1.0
    assert f"{agreement[('shadow-x', 'champion')]:.4f}" in text
    # The SVG picture alone: well-formed, the same versions.
    svg_path = tmp_path / "report.svg"
    run("report", "--routing", routing, "--results", results, "--output", str(svg_path))
    root = ET.parse(svg_path).getroot()  # noqa: S314 - our own output, written a line above
    labels = " ".join(t.text or "" for t in root.iter("{http://www.w3.org/2000/svg}text"))
    assert all(v in labels for v in ("champion", "challenger", "shadow-x"))


def test_report_flags_go_together(models, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "workers", "report", "--model", models["binary"], "--results",
                           str(tmp_path), "--output", str(tmp_path / "r.html"), "--profile", "p.json"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --data: --profile and --data go together"
