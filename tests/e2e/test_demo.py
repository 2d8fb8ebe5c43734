"""The built-in demo's pretraining run: the digits demo trained as `make demo` trains it (one torchrun worker, two
threads) on S3, then evaluated from its export and straight from its S3 checkpoint, over 1 and 2 processes, and
compared with the same network untrained and with raw pixels."""

import json
import re
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
from service.reports.health import HEALTHY
from service.spec import StorageSpec
from service.storage.filesystem import filesystem
from tests.support.runs import DIGITS, overrides, run_barlow, stats_records
from tests.support.s3_server import TEST_CREDENTIALS

# the first test's setup trains the whole demo: 7 min alone on 2 cores, 14 min on one xdist worker's core
pytestmark = [pytest.mark.torchrun, pytest.mark.timeout(1800)]


def barlow(*args: str, torchrun: int | None = None, threads: int = 1, timeout: float = 600) -> str:
    result = run_barlow(*args, torchrun=torchrun, threads=threads, env=TEST_CREDENTIALS, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def pretrained(s3_server) -> tuple[str, StorageSpec]:
    """The demo's pretraining, the whole recipe as `make demo` trains it (specs/digits.yaml unchanged: 30 epochs,
    240 steps, the kNN monitor every 10 epochs; one torchrun worker, a thread per core of its pytest worker's share:
    two in one process, one under `make test`'s two xdist workers), on S3.

    No cheaper run can stand in. The promise is a property of this recipe (README: 10 epochs stayed below the
    untrained network on every probe, 20 beat it on kNN and 5-shot only) and the monitor's epochs are the recipe's.
    The evaluations reuse it, at no cost in training, because one of their checks needs a backbone that learned:
    a tiny run's (tests/support/runs.py) reached 23 % on the 2-epoch linear probe, under its bar of 40. It starts
    first under xdist (tests/conftest.py): the longest unit of work, 840-948 s on one core beside the other worker's."""
    run_url = f"{s3_server.create_bucket('pretrained')}/digits"
    barlow("train", DIGITS, *overrides(f"run.output={run_url}", f"storage.endpoint_url={s3_server.endpoint_url}"),
           torchrun=1, threads=2, timeout=1500)
    return run_url, StorageSpec(endpoint_url=s3_server.endpoint_url)


def evaluate(weights: str, output: Path, endpoint: str, *settings: str, torchrun: int | None = None) -> dict:
    barlow("evaluate", "specs/digits-linear.yaml", *overrides(
        f"backbone.weights={weights}", f"run.output={output}", f"storage.endpoint_url={endpoint}", *settings),
        torchrun=torchrun)
    return json.loads((output / "results.json").read_text())


def test_the_knn_monitor_logs_during_pretraining(pretrained, aws_env):
    run_url, storage = pretrained
    fs, path = filesystem(run_url, storage)
    monitor = [line for line in stats_records(fs.cat_file(f"{path}/stats.txt").decode()) if "knn_top1" in line]
    assert [line["epoch"] for line in monitor] == [9, 19, 29]
    assert monitor[-1]["knn_top1"] > monitor[0]["knn_top1"]


def test_export_and_s3_checkpoint_evaluate_alike_over_one_and_two_processes(pretrained, s3_server, tmp_path):
    """`barlow export` of the run (its model folder, model.safetensors) and the run's newest checkpoint on S3 give
    the same kNN accuracy, over one process and two; so do the linear probes, up to float summation order."""
    run_url, _ = pretrained
    endpoint = s3_server.endpoint_url
    folder = tmp_path / "model"
    printed = barlow("export", run_url, str(folder), "--endpoint-url", endpoint)
    assert f"wrote {folder} from {run_url}/checkpoints/step-000000240: model.safetensors, config.json, README.md" \
        in printed
    config = json.loads((folder / "config.json").read_text())["barlow_twins"]
    assert config["checkpoint"]["step"] == 240 and config["data"] == {"dataset": "digits", "train_images": 1078,
                                                                       "image_size": 16}
    assert config["knn_monitor"]["epoch"] == 29 and "after epoch 30" in (folder / "README.md").read_text()
    # the export over one process, the S3 checkpoint over two: neither the form nor the world size moves a score
    exported = evaluate(str(folder), tmp_path / "export", endpoint, "eval.mode=knn")
    from_checkpoint = evaluate(run_url, tmp_path / "two", endpoint, "eval.mode=knn", torchrun=2)
    assert (exported["acc1"], exported["acc5"]) == (from_checkpoint["acc1"], from_checkpoint["acc5"])

    one = evaluate(run_url, tmp_path / "linear-1", endpoint, "eval.epochs=2")
    two = evaluate(run_url, tmp_path / "linear-2", endpoint, "eval.epochs=2", torchrun=2)
    # the same global batches and averaged gradients: the two runs differ only by float summation order
    assert abs(one["acc1"] - two["acc1"]) <= 0.5, (one, two)
    assert one["acc1"] > 40  # 10 classes: far above chance after 2 epochs (10 epochs reach ~92)


def test_the_demo_is_judged_healthy(pretrained, tmp_path):
    run_url, storage = pretrained
    page = tmp_path / "report.html"
    barlow("report", run_url, "-o", str(page), "--endpoint-url", storage.endpoint_url)
    text = page.read_text()
    health = json.loads(re.search(r'<script type="application/json" id="health-data">(.*?)</script>', text)[1])
    assert [attempt["verdict"] for attempt in health] == [HEALTHY], health
    assert [signal["state"] for signal in health[0]["signals"][:2]] == [HEALTHY, HEALTHY]
    assert "<th>verdict</th><td>healthy (" in text
    # the saves at epochs 10, 20 and 30 fold into one row of the events (keep_last 2 deletes one, not its event)
    assert "<td>checkpoint x 3</td><td>80-240</td>" in text


def test_pretraining_beats_the_untrained_network_and_raw_pixels(pretrained):
    """The demo's promise (README): its backbone beats the strongest untrained network on every probe, and raw
    pixels on the linear probe."""
    run_url, storage = pretrained
    printed = barlow("compare", DIGITS, "--weights", f"{run_url}/resnet18.pth",
                     *overrides(f"storage.endpoint_url={storage.endpoint_url}"), threads=2)
    print(printed)
    table = printed[printed.index("held-out accuracy"):].splitlines()
    assert table[0].split()[2:] == ["kNN", "(k=200)", "linear", "5-shot", "1-NN"]
    results = {name: dict(zip(PROBES, map(float, scores))) for name, *scores in
               (line.rsplit(maxsplit=3) for line in table[1:5])}
    assert list(results) == [PRETRAINED, DEFAULT_INIT, PRETRAINING_INIT, PIXELS]
    ours, bar, pixels = results[PRETRAINED], strongest_untrained(results), results[PIXELS]
    knn, linear, few_shot = PROBES
    # measured (make demo, colour on the device): kNN 0.936 against 0.809, 5-shot 0.880 against 0.800 (both bars:
    # the default initialisation); held with room. Linear 0.982 against 0.975 (default init) and 0.974 (pixels): 5
    # and 6 of the 719 held-out digits, within what another CPU's float rounding moves a run by (0.01 seen), so held
    # as strictly better, no more
    assert ours[knn] >= bar[knn] + 0.08, results
    assert ours[few_shot] >= bar[few_shot] + 0.05, results
    assert ours[linear] > bar[linear], results
    assert ours[linear] > pixels[linear], results
