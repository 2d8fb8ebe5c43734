"""Evaluation of a real pretraining run: the digits demo trained as `make demo` trains it (one torchrun worker, two
threads) on S3, then evaluated from its export and straight from its S3 checkpoint, over 1 and 2 processes, and
compared with the same network untrained and with raw pixels."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.evaluation.compare import (
    DEFAULT_INIT,
    PIXELS,
    PRETRAINED,
    PRETRAINING_INIT,
    PROBES,
    strongest_untrained,
)
from service.spec import StorageSpec
from service.storage.filesystem import filesystem
from tests.support.s3_server import TEST_CREDENTIALS

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, nproc: int | None = None, threads: int = 1, timeout: int = 900) -> str:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] \
        if nproc else [sys.executable]
    result = subprocess.run([*launcher, "-m", "service", *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=timeout, env={**os.environ, **TEST_CREDENTIALS, "OMP_NUM_THREADS": str(threads)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def pretrained(s3_server) -> tuple[str, StorageSpec]:
    """The demo's pretraining (specs/digits.yaml: 30 epochs, kNN monitor every 10) on S3, as make demo runs it."""
    run_url = f"{s3_server.create_bucket('pretrained')}/digits"
    run("train", "specs/digits.yaml", "--set", f"run.output={run_url}", "--set",
        f"storage.endpoint_url={s3_server.endpoint_url}", nproc=1, threads=2)
    return run_url, StorageSpec(endpoint_url=s3_server.endpoint_url)


def evaluate(weights: str, output: str, endpoint: str, *overrides: str, nproc: int | None = None) -> dict:
    settings = [f"backbone.weights={weights}", f"run.output={output}", f"storage.endpoint_url={endpoint}", *overrides]
    run("evaluate", "specs/digits-linear.yaml", *[arg for s in settings for arg in ("--set", s)], nproc=nproc)
    return json.loads(Path(output, "results.json").read_text())


def test_the_knn_monitor_logs_during_pretraining(pretrained, aws_env):
    run_url, storage = pretrained
    fs, path = filesystem(run_url, storage)
    lines = [json.loads(line) for line in fs.cat_file(f"{path}/stats.txt").decode().splitlines()
             if line.startswith("{")]
    monitor = [line for line in lines if "knn_top1" in line]
    assert [line["epoch"] for line in monitor] == [9, 19, 29]
    assert monitor[-1]["knn_top1"] > monitor[0]["knn_top1"]


def test_export_and_s3_checkpoint_evaluate_alike_over_one_and_two_processes(pretrained, s3_server, tmp_path):
    run_url, _ = pretrained
    endpoint = s3_server.endpoint_url
    exported = evaluate(f"{run_url}/resnet18.pth", str(tmp_path / "export"), endpoint, "eval.mode=knn")
    from_checkpoint = evaluate(run_url, str(tmp_path / "checkpoint"), endpoint, "eval.mode=knn")
    two_processes = evaluate(run_url, str(tmp_path / "two"), endpoint, "eval.mode=knn", nproc=2)
    assert exported["acc1"] == from_checkpoint["acc1"] == two_processes["acc1"]
    assert exported["acc5"] == from_checkpoint["acc5"] == two_processes["acc5"]

    one = evaluate(run_url, str(tmp_path / "linear-1"), endpoint, "eval.epochs=2")
    two = evaluate(run_url, str(tmp_path / "linear-2"), endpoint, "eval.epochs=2", nproc=2)
    # the same global batches and averaged gradients: the two runs differ only by float summation order
    assert abs(one["acc1"] - two["acc1"]) <= 0.5, (one, two)
    assert one["acc1"] > 40  # 10 classes: far above chance after 2 epochs (10 epochs reach ~92)


def test_pretraining_beats_the_untrained_network_and_raw_pixels(pretrained, aws_env):
    """The demo's promise (README): its backbone beats the strongest untrained network on every probe, and raw
    pixels on the linear probe."""
    run_url, storage = pretrained
    printed = run("compare", "specs/digits.yaml", "--weights", f"{run_url}/resnet18.pth", "--set",
                  f"storage.endpoint_url={storage.endpoint_url}", threads=2)
    print(printed)
    table = printed[printed.index("held-out accuracy"):].splitlines()
    assert table[0].split()[2:] == ["kNN", "(k=200)", "linear", "5-shot", "1-NN"]
    results = {name: dict(zip(PROBES, map(float, scores))) for name, *scores in
               (line.rsplit(maxsplit=3) for line in table[1:5])}
    assert list(results) == [PRETRAINED, DEFAULT_INIT, PRETRAINING_INIT, PIXELS]
    ours, bar, pixels = results[PRETRAINED], strongest_untrained(results), results[PIXELS]
    knn, linear, few_shot = PROBES
    # measured (README): kNN 0.935 against 0.809, 5-shot 0.882 against 0.800 (both bars: the default
    # initialisation); held with room. Linear 0.986 against 0.975 (default init) and 0.974 (pixels): 8 and 9 of the
    # 719 held-out digits, within what another CPU's float rounding moves a run by (0.01 seen), so held as strictly
    # better, no more
    assert ours[knn] >= bar[knn] + 0.08, results
    assert ours[few_shot] >= bar[few_shot] + 0.05, results
    assert ours[linear] > bar[linear], results
    assert ours[linear] > pixels[linear], results
