"""The `barlow` command line as a user types it: validation errors, and a real digits pretraining run under
torchrun (the shared tiny run, tests/e2e/conftest.py)."""

import pytest
import torch
import torchvision

from service.checkpoint.export import read_weights
from service.spec import load_spec
from tests.support.runs import events, logged_steps, run_barlow

DIGITS = "specs/digits.yaml"


@pytest.mark.parametrize("override, named", [
    ("optim.lr_weight=0.3", "optim.lr_weight: unknown field; did you mean 'lr_weights'?"),
    ("optim.epochs=many", "optim.epochs: Input should be a valid integer"),
    ("optim.batch_size=2", "is smaller than the 3 workers"),
    ("checkpoint.allow_changes=[optim.epoch]", "names 'optim.epoch' (did you mean 'optim.epochs'?)"),
])
def test_bad_spec_is_one_clear_error_without_traceback(override, named):
    result = run_barlow("validate", DIGITS, "--set", override, "--world-size", "3")
    assert result.returncode == 2
    assert named in result.stderr and "Traceback" not in result.stderr


def test_missing_spec_file_is_a_clear_error():
    result = run_barlow("train", "specs/no-such-spec.yaml")
    assert result.returncode == 2 and "does not exist" in result.stderr and "Traceback" not in result.stderr


def test_digits_pretraining_under_torchrun_logs_every_step_and_exports(tiny_run, aws_env, tmp_path):
    """The shared tiny run: 2 torchrun workers, one epoch of 16 steps, on S3. That the loss falls is shown by the
    2-epoch run of test_trust's resume test (one epoch of warm-up is too short to tell a trend from the batches)."""
    command = tiny_run.read("stats.txt").decode().splitlines()[0]
    assert command.startswith("barlow train ") and "optim.batch_size=64" in command
    records = tiny_run.records()
    monitor = [record for record in records if "knn_top1" in record]  # after the last (and only) epoch
    assert [(record["epoch"], record["step"]) for record in monitor] == [(0, 16)]
    assert all(0 <= record["knn_top1"] <= 100 for record in monitor)
    # RankMe of the 1078 training digits' 512-wide ResNet-18 features (gathered from both workers, written once)
    assert all(record["rankme_sample"] == 1078 and 1 < record["rankme"] <= 512 for record in monitor), monitor
    happened = events(records)
    assert [(event["event"], event["step"]) for event in happened] == [
        ("start", 0), ("checkpoint", 4), ("checkpoint", 8), ("checkpoint", 12), ("checkpoint", 16), ("end", 16)]
    assert happened[0]["world_size"] == 2 and happened[0]["total_steps"] == 16
    lines = logged_steps(records)
    assert [line["step"] for line in lines] == list(range(16))  # 1078 digits // 64 = 16 steps per epoch
    # the reference's fields first, then this service's measurements
    assert all(list(line)[:6] == ["epoch", "step", "lr_weights", "lr_biases", "loss", "time"] for line in lines)
    assert all(line["images_per_s_per_worker"] == pytest.approx(line["images_per_s"] / 2) for line in lines)

    backbone = torchvision.models.resnet18()
    backbone.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    state = read_weights(f"{tiny_run.url}/resnet18.pth", tiny_run.storage)
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected
    (tmp_path / "spec.yaml").write_bytes(tiny_run.read("spec.yaml"))
    spec = load_spec(tmp_path / "spec.yaml")
    assert (spec.optim.epochs, spec.model.projector, spec.run.output) == (1, "64-64", tiny_run.url)
    assert f"backbone {tiny_run.url}/resnet18.pth" in tiny_run.result.stdout
