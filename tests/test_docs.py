import re
import subprocess
import sys


def test_readme_settings_table_is_generated_from_the_settings():
    readme = open("README.md").read()
    table = re.search(r"<!-- settings:start -->\n(.*)<!-- settings:end -->", readme, re.S).group(1)
    generated = subprocess.run([sys.executable, "-m", "workers", "settings"], capture_output=True, text=True).stdout
    assert table == generated, "README settings table is stale: run `scoring-worker settings` and paste it"


def test_readme_starts_with_the_two_commands():
    lines = open("README.md").read().splitlines()
    block = lines[lines.index("```sh") + 1: lines.index("```")]
    assert [line.split()[:2] for line in block] == [["make", "demo"], ["make", "test"]]


def test_demo_compares_like_with_like_and_says_what_each_figure_includes(tmp_path):
    """Issue #14 case 24: the demo once printed our whole batch run beside a bare predict on a frame in memory."""
    proc = subprocess.run([sys.executable, "-m", "workers", "demo", "--dir", str(tmp_path / "demo"), "--rows", "8000"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    memory = lines.index(next(line for line in lines if line.startswith("in memory, 2,000 rows already read")))
    assert "Router.score_table on the Arrow table" in lines[memory + 1]
    assert "Booster.predict on the pandas frame" in lines[memory + 2] and "(predict only)" in lines[memory + 2]
    end = lines.index(next(line for line in lines if line.startswith("end to end, Parquet in and out")))
    assert "scoring-worker batch" in lines[end + 1] and "the resume ledger" in lines[end + 1]
    assert "pandas read + predict + to_parquet" in lines[end + 2]
    for line in lines[memory + 1: memory + 3] + lines[end + 1: end + 3]:
        assert re.search(r"[\d,]+ rows/s  \(.+\)$", line), line  # a rate, then what it includes
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]  # written only under its folder
