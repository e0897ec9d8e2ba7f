"""Peak memory of a batch run must not grow with the input: row groups are streamed, never whole files."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers import write_inputs

pytestmark = pytest.mark.slow



def peak_rss_kib(args: list[str], out_file: str) -> int:
    # VmHWM, not getrusage's ru_maxrss: the latter survives exec, so a child would report its parent's peak.
    code = (
        "import sys\n"
        "from workers.cli import main\n"
        f"sys.argv = ['scoring-worker', *{args!r}]\n"
        "try:\n    main()\n"
        "finally:\n"
        "    hwm = next(line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM'))\n"
        f"    open({out_file!r}, 'w').write(hwm)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return int(open(out_file).read())


def test_peak_rss_is_flat_when_the_input_grows_10x(models, tmp_path):
    small, big = str(tmp_path / "small"), str(tmp_path / "big")
    # One file each, so the 10x is inside a single file (the case that breaks naive readers).
    write_inputs(small, files=1, rows=150_000, row_group=10_000)
    write_inputs(big, files=1, rows=1_500_000, row_group=10_000)
    common = ["batch", "--model", models["binary"], "--batch-rows", "10000", "--progress", "log"]
    rss_small = peak_rss_kib([*common, "--input", small, "--output", str(tmp_path / "o1")], str(tmp_path / "r1"))
    rss_big = peak_rss_kib([*common, "--input", big, "--output", str(tmp_path / "o2")], str(tmp_path / "r2"))
    size_big = os.path.getsize(os.path.join(big, "part-000.parquet"))
    print(f"\npeak RSS: {rss_small / 1024:.0f} MiB for 150k rows, {rss_big / 1024:.0f} MiB for 1.5M rows "
          f"({size_big / 2**20:.0f} MiB file); ratio {rss_big / rss_small:.3f}")
    assert rss_big <= rss_small * 1.10
