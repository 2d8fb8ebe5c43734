"""The `barlow` command line, end to end: validation errors, and real digits pretraining runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
import yaml

from service.cli import main
from service.spec import load_spec
from tests.support.runs import resumed_step

ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / "specs" / "digits.yaml")


def barlow(*args: str, torchrun: int | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "service"]
    if torchrun:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={torchrun}",
                    "-m", "service"]
    return subprocess.run([*launcher, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


def stats_lines(output: Path) -> tuple[str, list[dict]]:
    command, *lines = (output / "stats.txt").read_text().splitlines()
    return command, [json.loads(line) for line in lines]


def test_validate_prints_the_resolved_spec(capsys):
    assert main(["validate", DIGITS, "--set", "optim.lr_weights=0.3"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["optim"]["lr_weights"] == 0.3
    assert printed == load_spec(DIGITS, ["optim.lr_weights=0.3"]).model_dump(mode="json")


def test_schema_command_writes_the_json_schema(tmp_path):
    assert main(["schema", "-o", str(tmp_path / "schema.json")]) == 0
    schema = json.loads((tmp_path / "schema.json").read_text())
    assert {"data", "augment", "model", "loss", "optim", "run"} <= set(schema["properties"])


@pytest.mark.parametrize("override, named", [
    ("optim.lr_weight=0.3", "optim.lr_weight: unknown field; did you mean 'lr_weights'?"),
    ("optim.epochs=many", "optim.epochs: Input should be a valid integer"),
    ("optim.batch_size=2", "is smaller than the 3 workers"),
    ("checkpoint.allow_changes=[optim.epoch]", "names 'optim.epoch' (did you mean 'optim.epochs'?)"),
])
def test_bad_spec_is_one_clear_error_without_traceback(override, named):
    result = barlow("validate", DIGITS, "--set", override, "--world-size", "3")
    assert result.returncode == 2
    assert named in result.stderr and "Traceback" not in result.stderr


def test_missing_spec_file_is_a_clear_error():
    result = barlow("train", "specs/no-such-spec.yaml")
    assert result.returncode == 2 and "does not exist" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_digits_pretraining_under_torchrun_loss_falls_and_exports(tmp_path):
    output = tmp_path / "run"
    result = barlow("train", DIGITS, "--set", f"run.output={output}", "--set", "optim.epochs=3",
                    "--set", "run.log_every=1", "--set", "monitor.knn_every_epochs=2", torchrun=2)
    assert result.returncode == 0, result.stderr[-3000:]

    command, lines = stats_lines(output)
    assert command.startswith("barlow train ") and "optim.epochs=3" in command
    monitor = [line for line in lines if "knn_top1" in line]  # every 2 epochs and the last
    assert [(line["epoch"], line["step"]) for line in monitor] == [(1, 16), (2, 24)]
    assert all(0 <= line["knn_top1"] <= 100 for line in monitor)
    events = [line for line in lines if "event" in line]
    assert [(event["event"], event["step"]) for event in events] == [
        ("start", 0), ("checkpoint", 8), ("checkpoint", 16), ("checkpoint", 24), ("end", 24)]
    assert events[0]["world_size"] == 2 and events[0]["total_steps"] == 24
    lines = [line for line in lines if "knn_top1" not in line and "event" not in line]
    assert [line["step"] for line in lines] == list(range(24))  # 1078 digits // 128 = 8 steps per epoch
    # the reference's fields first, then this service's measurements
    assert all(list(line)[:6] == ["epoch", "step", "lr_weights", "lr_biases", "loss", "time"] for line in lines)
    assert all(line["images_per_s_per_worker"] == pytest.approx(line["images_per_s"] / 2) for line in lines)
    losses = [line["loss"] for line in lines]
    # the last epoch's mean against the first's (warm-up): measured 0.92; without updates (lr 0) about 1
    assert sum(losses[-8:]) / 8 < 0.95 * sum(losses[:8]) / 8, losses

    backbone = torchvision.models.resnet18()
    backbone.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    state = torch.load(output / "resnet18.pth", weights_only=True)
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected
    assert load_spec(output / "spec.yaml").optim.epochs == 3
    assert f"backbone {output / 'resnet18.pth'}" in result.stdout


@pytest.mark.slow
def test_rerun_resumes_from_the_last_epoch_checkpoint(tmp_path):
    output = tmp_path / "run"
    common = ("--set", f"run.output={output}", "--set", "run.log_every=1")
    assert barlow("train", DIGITS, *common, "--set", "optim.epochs=1").returncode == 0
    first_backbone = torch.load(output / "resnet18.pth", weights_only=True)
    refused = barlow("train", DIGITS, *common, "--set", "optim.epochs=2")  # a changed recipe, not named
    assert refused.returncode == 2 and "optim.epochs: 1 -> 2" in refused.stderr, refused.stderr[-3000:]
    result = barlow("train", DIGITS, *common, "--set", "optim.epochs=2",
                    "--set", "checkpoint.allow_changes=[optim.epochs]")
    assert result.returncode == 0, result.stderr[-3000:]
    text = (output / "stats.txt").read_text().splitlines()
    second_start = [i for i, line in enumerate(text) if line.startswith("barlow ")][1]
    lines = [json.loads(line) for line in text[second_start + 1:]]
    assert lines[0]["event"] == "start" and lines[0]["step"] == 8
    assert lines[0]["resumed_from"].endswith("step-000000008")
    resumed = [line for line in lines if "event" not in line]
    assert resumed[0] == {"epoch": 1, "step": 8, "resumed_with_changes": {"optim.epochs": [1, 2]},
                          "time": resumed[0]["time"]}
    training = [line for line in resumed if "loss" in line]
    assert [line["step"] for line in training] == list(range(8, 16)) and {line["epoch"] for line in training} == {1}
    assert [(line["epoch"], line["step"]) for line in resumed if "knn_top1" in line] == [(1, 16)]
    assert resumed_step(result.stderr) == 8  # the epoch's checkpoint, not step 0
    second_backbone = torch.load(output / "resnet18.pth", weights_only=True)
    assert not torch.equal(first_backbone["conv1.weight"], second_backbone["conv1.weight"])


def test_cuda_asked_for_on_a_machine_without_it_is_a_clear_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["train", DIGITS, "--set", "run.device=cuda"]) == 2
    assert "no usable CUDA device" in capsys.readouterr().err
