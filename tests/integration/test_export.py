"""`barlow export` (issue 32) in process on a real checkpoint: the model folder loads into torchvision, timm and
onnxruntime with the run's features, says what the run recorded, and is written whole or not at all. The demo's
own export, through the executable, is tests/e2e/test_demo.py's."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import fsspec
import pytest
import torch
import torchvision
import yaml
from safetensors.torch import load_file

from service.checkpoint.export import load_pretrained
from service.cli import main
from service.errors import USER_ERROR_EXIT
from service.spec import StorageSpec
from tests.support.training import Training

ROOT = Path(__file__).resolve().parents[2]
IMAGE_SIZE = 16
START = {"event": "start", "step": 0, "epoch": 0, "total_steps": 8, "steps_per_epoch": 4, "world_size": 2,
         "global_batch": 8, "dataset": "digits", "train_images": 1078, "wall": 1796602254.5, "time": 0}
KNN = {"epoch": 1, "step": 8, "knn_top1": 55.5, "rankme": 97.25, "rankme_sample": 1078, "time": 3}


def cifar_stem(model: torch.nn.Module) -> torch.nn.Module:
    """What the model card tells a user to do for the CIFAR stem, before loading."""
    model.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = torch.nn.Identity()
    return model


def evaluation_beside(root: Path, name: str, weights: str, results: dict) -> None:
    folder = root / name
    folder.mkdir()
    (folder / "spec.yaml").write_text(yaml.safe_dump({"backbone": {"weights": weights, "arch": "resnet18"}}))
    (folder / "results.json").write_text(json.dumps(results))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Training]:
    """A run folder as training leaves it: a checkpoint at step 8 (2 epochs of 4 steps), stats.txt with its start
    and kNN lines; beside it the linear probe of its export, another backbone's evaluation and a hostile one."""
    root = tmp_path_factory.mktemp("export")
    run = root / "digits"
    training = Training(str(run), image_size=IMAGE_SIZE)
    training.step(0)
    training.step(1)
    training.manager.save(8, wait=True)
    training.manager.close()
    (run / "stats.txt").write_text("barlow train specs/digits.yaml\n" + json.dumps(START) + "\n" + json.dumps(KNN)
                                   + "\n")
    result = {"mode": "linear", "acc1": 81.25, "acc5": 99.0, "best_acc1": 82.0, "best_acc5": 99.0, "epochs": 10,
              "train_images": 1078, "output": "x"}
    evaluation_beside(root, "digits-linear", f"{run}/resnet18.pth", result)
    evaluation_beside(root, "digits-other", str(root / "other" / "resnet18.pth"), {**result, "acc1": 12.5})
    evaluation_beside(root, "digits-hostile", str(run), {**result, "acc1": "<script>alert(1)</script>"})
    evaluation_beside(root, "digits-bomb", str(run), {})
    (root / "digits-bomb" / "results.json").write_text("[" * 50_000)  # under the size bound, nested past the stack
    return run, training


@pytest.fixture(scope="module")
def folder(run, tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("exported") / "digits-model"
    assert main(["export", str(run[0]), str(dest)]) == 0
    return dest


def our_features(training: Training, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return training.model.backbone.eval()(images)


def test_the_folder_loads_into_torchvision_and_timm_with_the_runs_features(run, folder):
    import timm

    _, training = run
    assert sorted(path.name for path in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    state = load_file(folder / "model.safetensors")
    images = torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    ours = our_features(training, images)

    resnet = cifar_stem(torchvision.models.resnet18())
    missing, unexpected = resnet.load_state_dict(state, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected  # only fc: the README's one-liner
    resnet.fc = torch.nn.Identity()
    with torch.no_grad():
        torch.testing.assert_close(resnet.eval()(images), ours)

    model = cifar_stem(timm.create_model("resnet18", pretrained=False, num_classes=0))
    model.load_state_dict(state)  # strict: timm's ResNet has torchvision's key names
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(images), ours, rtol=1e-5, atol=1e-5)


def test_config_and_card_say_what_the_run_recorded(run, folder):
    run_path, _ = run
    config = json.loads((folder / "config.json").read_text())
    manifest = json.loads((run_path / "checkpoints/step-000000008/manifest.json").read_text())
    facts = config["barlow_twins"]
    assert (config["architecture"], config["num_features"], config["num_classes"]) == ("resnet18", 512, 0)
    assert config["pretrained_cfg"]["input_size"] == [3, IMAGE_SIZE, IMAGE_SIZE]
    assert config["pretrained_cfg"]["mean"] == manifest["spec"]["augment"]["mean"]
    assert (facts["stem"], facts["projector"]) == ("cifar", {"sizes": [512, 32, 16], "included": False})
    assert facts["checkpoint"]["url"] == f"{run_path}/checkpoints/step-000000008"
    assert (facts["checkpoint"]["step"], facts["checkpoint"]["epoch"]) == (8, 2)
    resolved = yaml.safe_dump(manifest["spec"], sort_keys=False)  # the run's spec.yaml is this YAML of it
    assert facts["spec_sha256"] == hashlib.sha256(resolved.encode()).hexdigest()
    assert facts["data"] == {"dataset": "digits", "train_images": 1078, "image_size": IMAGE_SIZE}
    weights = (folder / "model.safetensors").read_bytes()
    assert facts["files"]["model.safetensors"]["sha256"] == hashlib.sha256(weights).hexdigest()
    assert facts["files"]["model.safetensors"]["bytes"] == len(weights)
    assert facts["knn_monitor"] == {key: KNN[key] for key in ("epoch", "step", "knn_top1", "rankme", "rankme_sample")}
    assert [(e["mode"], e["acc1"]) for e in facts["evaluations"]] == [("linear", 81.25)]  # not the others'

    card = (folder / "README.md").read_text()
    assert "1,078 training images" in card and "top-1 55.50 %" in card and "RankMe 97.2 over 1078" in card
    assert "top-1 81.25 %, top-5 99.00 %" in card and "12.50" not in card and "<script>" not in card
    assert "step 8 of 8 (epoch 2 of" in card and facts["spec_sha256"] in card
    assert 'timm.create_model("resnet18", pretrained=False, num_classes=0)' in card
    assert "CC BY-NC 4.0" in card


def test_onnx_runs_in_onnxruntime_on_any_batch_and_pth_and_projector_are_written(run, tmp_path, capsys):
    import onnxruntime

    run_path, training = run
    dest = tmp_path / "model"
    assert main(["export", str(run_path), str(dest), "--format", "onnx", "--format", "pth", "--with-projector"]) == 0
    printed = capsys.readouterr().out
    assert "model.onnx checked in onnxruntime: largest difference from PyTorch" in printed
    assert sorted(path.name for path in dest.iterdir()) == [
        "README.md", "config.json", "model.onnx", "projector.pth", "resnet18.pth"]
    session = onnxruntime.InferenceSession(str(dest / "model.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 5):  # the batch dimension is dynamic
        images = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(batch))
        (features,) = session.run(["features"], {"images": images.numpy()})
        torch.testing.assert_close(torch.from_numpy(features), our_features(training, images), rtol=1e-4, atol=1e-4)
    backbone = torch.load(dest / "resnet18.pth", weights_only=True)
    assert backbone.keys() == training.model.backbone.state_dict().keys()
    assert all(torch.equal(value, training.model.backbone.state_dict()[key]) for key, value in backbone.items())
    projector = torch.load(dest / "projector.pth", weights_only=True)
    assert all(torch.equal(value, training.model.projector.state_dict()[key]) for key, value in projector.items())
    assert json.loads((dest / "config.json").read_text())["barlow_twins"]["onnx_max_difference"] < 1e-4


def test_evaluate_and_torch_hub_load_the_folder_and_its_safetensors(run, folder):
    _, training = run
    expected = training.model.backbone.state_dict()
    for source in (folder, folder / "model.safetensors"):
        state = load_pretrained(str(source), StorageSpec())  # what barlow evaluate and compare load
        assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in expected)
    hub = torch.hub.load(str(ROOT), "resnet18", source="local", weights=str(folder / "model.safetensors"))
    images = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        torch.testing.assert_close(hub.eval()(images), our_features(training, images))


def test_a_weights_file_that_is_not_one_is_refused_in_one_line(tmp_path):
    from service.errors import CheckpointError

    fake = tmp_path / "model.safetensors"
    fake.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(CheckpointError, match="is not a weights file"):
        load_pretrained(str(fake), StorageSpec())


def test_an_export_never_overwrites_and_a_failed_one_leaves_nothing(run, tmp_path, monkeypatch, capsys):
    run_path, _ = run
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    assert main(["export", str(run_path), str(taken)]) == USER_ERROR_EXIT
    assert "already holds something" in capsys.readouterr().err
    assert [path.name for path in taken.iterdir()] == ["notes.txt"]

    written = []

    def failing_write(self, data):  # the disk fills up at the second file
        if written:
            raise OSError(28, "No space left on device")
        written.append(self.name)
        return len(data)

    monkeypatch.setattr(Path, "write_bytes", failing_write)
    assert main(["export", str(run_path), str(tmp_path / "new")]) == USER_ERROR_EXIT
    monkeypatch.undo()
    assert written == ["model.safetensors"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["taken"]  # no DEST, no partial folder


@pytest.mark.s3
def test_on_s3_the_card_is_written_last_and_a_failed_export_removes_its_objects(run, s3_bucket, s3_server, monkeypatch):
    from s3fs import S3FileSystem

    run_path, _ = run
    endpoint = ["--endpoint-url", s3_server.endpoint_url]
    order = []
    pipe_file = S3FileSystem.pipe_file

    def recording(self, path, data, **kwargs):
        order.append(path.rsplit("/", 1)[-1])
        return pipe_file(self, path, data, **kwargs)

    monkeypatch.setattr(S3FileSystem, "pipe_file", recording)
    assert main(["export", str(run_path), f"{s3_bucket}/models/digits", *endpoint]) == 0
    assert order[-1] == "README.md" and sorted(order) == ["README.md", "config.json", "model.safetensors"]
    fs = fsspec.filesystem("s3", endpoint_url=s3_server.endpoint_url)
    bucket = s3_bucket.removeprefix("s3://")
    assert sorted(path.rsplit("/", 1)[-1] for path in fs.find(f"{bucket}/models/digits")) == sorted(order)

    def failing(self, path, data, **kwargs):
        if path.endswith("config.json"):
            raise OSError(5, "connection reset")
        return pipe_file(self, path, data, **kwargs)

    monkeypatch.setattr(S3FileSystem, "pipe_file", failing)
    assert main(["export", str(run_path), f"{s3_bucket}/models/failed", *endpoint]) == USER_ERROR_EXIT
    fs.invalidate_cache()
    assert fs.find(f"{bucket}/models/failed") == []


def test_a_manifest_whose_spec_this_version_cannot_read_is_one_error(run, tmp_path, capsys):
    run_path, _ = run
    copy = tmp_path / "digits"
    shutil.copytree(run_path, copy)
    manifest_path = copy / "checkpoints/step-000000008/manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["spec"]["optim"]["momentum_schedule"] = "cosine"  # a field of another version, or planted
    manifest_path.write_text(json.dumps(manifest))
    assert main(["export", str(copy), str(tmp_path / "out")]) == USER_ERROR_EXIT
    error = capsys.readouterr().err
    assert "not a training spec this version reads" in error and "optim.momentum_schedule" in error
    assert len(error.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_onnx_without_its_optional_packages_says_what_to_install_before_reading_anything(run, tmp_path, monkeypatch,
                                                                                         capsys):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if not installed: importing it raises ImportError
    assert main(["export", str(run[0]), str(tmp_path / "out"), "--format", "onnx"]) == USER_ERROR_EXIT
    error = capsys.readouterr().err
    assert "onnxscript is missing" in error and "pip install 'barlowtwins-service[onnx]'" in error
    assert not (tmp_path / "out").exists()


def test_an_onnx_graph_that_does_not_compute_the_features_is_not_written(run, tmp_path, monkeypatch, capsys):
    """The check is read: with no tolerance, onnxruntime's own summation order already fails it."""
    import service.export.onnx_model

    monkeypatch.setattr(service.export.onnx_model, "TOLERANCE", 0.0)
    assert main(["export", str(run[0]), str(tmp_path / "out"), "--format", "onnx"]) == USER_ERROR_EXIT
    assert "the ONNX graph's features differ from PyTorch's by up to" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_damaged_or_unfinished_folder_is_refused_by_the_evaluation_that_reads_it(folder, tmp_path, capsys):
    """The sha256 config.json records is read back: one changed byte of the weights, or a folder whose card
    (written last) is missing, is one line from `barlow evaluate`, before anything is trained."""
    damaged = tmp_path / "damaged"
    shutil.copytree(folder, damaged)
    weights = bytearray((damaged / "model.safetensors").read_bytes())
    weights[-1] ^= 0xFF  # the last tensor's last byte: still a readable safetensors file
    (damaged / "model.safetensors").write_bytes(bytes(weights))
    unfinished = tmp_path / "unfinished"
    shutil.copytree(folder, unfinished)
    (unfinished / "README.md").unlink()
    for copy, error in ((damaged, "does not have the sha256 its folder's config.json records"),
                        (unfinished, "an export that did not finish")):
        code = main(["evaluate", str(ROOT / "specs/digits-linear.yaml"), "--set", f"backbone.weights={copy}",
                     "--set", f"run.output={tmp_path / copy.name}-eval", "--set", "eval.mode=knn"])
        printed = capsys.readouterr().err
        assert code == USER_ERROR_EXIT and error in printed, printed
        assert not (tmp_path / f"{copy.name}-eval" / "results.json").exists()
