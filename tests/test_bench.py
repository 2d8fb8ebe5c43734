"""The benchmarks run (in a reduced size) and print their tables; their timings are not asserted."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_checkpoint_benchmark_reports_every_ratio():
    result = subprocess.run([sys.executable, "bench/checkpoint.py", "--small"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {line[:28].strip(): line[28:].split() for line in result.stdout.splitlines()[2:5]}
    assert set(rows) == {"training stall of a save", "save, until committed", "load"}
    assert all(float(value) > 0 for row in rows.values() for value in row)
    # the stall is the part of the save that training waits for: never more than the whole save
    assert float(rows["training stall of a save"][0]) <= float(rows["save, until committed"][0])
