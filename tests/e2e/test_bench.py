"""Each benchmark runs, at the smallest size its options allow, and prints its table with its ratios; the timings
are not asserted."""

import os
import re
import subprocess
import sys

import pytest

from tests.support.runs import ROOT


def run(script: str, *args: str, env: dict[str, str] | None = None,
        timeout: float = 600) -> subprocess.CompletedProcess:
    """bench/SCRIPT ARGS as its docstring runs it (bash for a .sh), from the repository root, each of its processes
    on one thread: on a machine shared with other tests OpenMP's waiting threads would spin against them, and the
    timings are not asserted. Fails unless it exits 0."""
    command = ["bash" if script.endswith(".sh") else sys.executable, f"bench/{script}", *args]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_checkpoint_benchmark_reports_every_ratio():
    result = run("checkpoint.py", "--small")
    rows = {line[:28].strip(): line[28:].split() for line in result.stdout.splitlines()[2:5]}
    assert set(rows) == {"training stall of a save", "save, until committed", "load"}
    assert all(float(value) > 0 for row in rows.values() for value in row)
    # the stall is the part of the save that training waits for: never more than the whole save
    assert float(rows["training stall of a save"][0]) <= float(rows["save, until committed"][0])


def test_communication_benchmark_reports_both_plans():
    result = run("communication.py", "--dim", "256", "--batch", "32", "--procs", "2", "--steps", "1")
    rows = [line.split() for line in result.stdout.splitlines()[2:]]
    assert [row[:2] for row in rows] == [["2", "reduce"], ["2", "gather"]]
    assert float(rows[0][3]) == 1.0 and all(float(row[2]) > 0 for row in rows)
    # bytes from the collectives' sizes: reduce 2 x 2(W-1)/W x 4 D^2 (+ statistics), gather (W-1)/W x 2 N D x 4
    assert float(rows[1][4]) == pytest.approx(0.5 * 2 * 32 * 256 * 4 / 1e6, abs=0.01)
    assert float(rows[0][4]) > float(rows[1][4])


def table(stdout: str, header: str) -> dict[str, list[str]]:
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header)) + 1
    return {line[:46].strip(): line[46:].split() for line in lines[start:] if line.strip()}


def test_augmentation_benchmark_compares_with_lightly():
    result = run("augmentation.py", "--images", "2", "--rounds", "1")
    rows = table(result.stdout, "pipeline")
    assert len(rows) == 4 and any(name.startswith("lightly") for name in rows)
    lightly_row = next(row for name, row in rows.items() if name.startswith("lightly"))
    assert float(lightly_row[1]) == 1.0 and all(float(row[0]) > 0 for row in rows.values())


def test_training_step_benchmark_compares_with_lightly():
    result = run("training_step.py", "--batch", "4", "--size", "8", "--steps", "1", "--threads", "1")
    lines = result.stdout.splitlines()[2:]
    assert lines[0].startswith("ours") and lines[1].startswith("lightly") and lines[2].startswith("ours + non-finite")
    assert float(lines[1].split()[-1]) == 1.0 and float(lines[0].split()[-2]) > 0 and float(lines[2].split()[-2]) > 0


def test_gpu_benchmark_script_runs_every_configuration_on_the_cpu():
    result = run("gpu.sh", "--device", "cpu", "--small", "--steps", "1", "--warmup", "0", "--workers", "1",
                 env={"BATCH": "4", "TORCHDYNAMO_DISABLE": "1", "PYTHON": sys.executable}, timeout=900)
    rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()
            if line.startswith(("fp32", "bf16"))}
    assert list(rows) == ["fp32", "bf16", "bf16+cl", "bf16+cl+compile", "bf16+cl+compile+jpeg"]
    assert all(float(images) > 0 for images, _ in rows.values()), result.stdout
    assert rows["fp32"][1] == "1.00"


def test_data_loading_benchmark_compares_with_webdataset():
    result = run("data_loading.py", "--images", "32", "--batch", "8", "--workers", "1",
                 "--shard-mb", "1", "--latency-ms", "1", "2")
    rows = {cells[1].strip(): cells[2:-1] for cells in (line.split("|") for line in result.stdout.splitlines()
                                                           if line.startswith("| ") and "---" not in line)}
    assert list(rows)[1:] == ["ours, fetch only", "webdataset, fetch only", "ours, end to end, cold",
                              "webdataset, end to end", "ours, end to end, shard cache warm",
                              "local folder (ImageFolder), end to end"]
    # every reader delivered images; the request counts are what the rows are about
    assert all(float(row[0]) > 0 for name, row in rows.items() if name != "reader")
    assert int(rows["ours, end to end, shard cache warm"][-1]) == 0  # the warm cache makes no request
    assert int(rows["ours, fetch only"][-1]) >= 32  # one ranged read per image
    ratios = next(line for line in result.stdout.splitlines() if line.startswith("ours / webdataset: "))
    found = re.findall(r"\d+\.\d+", ratios)  # fetch only, end to end cold, cache warm / local folder
    assert len(found) == 3 and all(float(ratio) > 0 for ratio in found), ratios


def test_logging_cost_benchmark_reports_every_row():
    result = run("logging_cost.py", "--batch", "4", "--size", "8", "--steps", "1", "--threads", "1")
    rows = table(result.stdout, "step")
    assert list(rows) == ["unlogged step", "logged as the reference (loss, stats.txt)",
                          "logged as here (all fields, TensorBoard)", "+ the cross-correlation image",
                          "as here, monitor off: + RankMe of the batch"]
    assert float(rows["unlogged step"][1]) == 1.0 and all(float(row[0]) > 0 for row in rows.values())
