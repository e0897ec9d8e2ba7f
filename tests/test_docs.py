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
