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


@pytest.mark.slow
def test_communication_benchmark_reports_both_plans():
    result = subprocess.run([sys.executable, "bench/communication.py", "--dim", "256", "--batch", "32", "--procs", "2",
                             "--steps", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split() for line in result.stdout.splitlines()[2:]]
    assert [row[:2] for row in rows] == [["2", "reduce"], ["2", "gather"]]
    assert float(rows[0][3]) == 1.0 and all(float(row[2]) > 0 for row in rows)
    # bytes from the collectives' sizes: reduce 2 x 2(W-1)/W x 4 D^2 (+ statistics), gather (W-1)/W x 2 N D x 4
    assert float(rows[1][4]) == pytest.approx(0.5 * 2 * 32 * 256 * 4 / 1e6, abs=0.01)
    assert float(rows[0][4]) > float(rows[1][4])
