"""service/checkpoint/catalog.py: a checkpoint's manifest.json is read whole when it has the form this project writes;
each other form (a wrong type, a path-like object name, a nesting bomb, non-UTF-8, too many bytes) is one line naming
the file and the field. Real checkpoints' manifests: tests/integration/test_checkpoint.py."""

import json

import fsspec
import pytest

from service.checkpoint import catalog as checkpoint
from service.checkpoint.dcp_io import ForeignObject
from service.storage.untrusted import UntrustedObject

GOOD_MANIFEST = dict(format=1, step=8, epoch=0, batch_in_epoch=8, steps_per_epoch=16, world_size=1, scaler={},
                     run_id="d7c1e3adb999", spec={"model": {"backbone": "resnet18"}}, created="2026-12-05",
                     objects=[dict(name=".metadata", size=10, crc32=1), dict(name="__0_0.distcp", size=20, crc32=2)])


def manifest_at(text: str | bytes) -> tuple[fsspec.AbstractFileSystem, str]:
    fs = fsspec.filesystem("memory")
    fs.pipe_file("/run/manifest.json", text.encode() if isinstance(text, str) else text)
    return fs, "/run/manifest.json"


def test_a_manifest_of_the_form_this_project_writes_is_read_whole():
    manifest = checkpoint.read_manifest(*manifest_at(json.dumps({**GOOD_MANIFEST, "versions": {"torch": "2.14"}})))
    assert manifest == {**GOOD_MANIFEST, "versions": {"torch": "2.14"}}  # fields it does not check are kept


@pytest.mark.parametrize("change, match", [
    ({"step": "8"}, "step: Input should be a valid integer"),
    ({"epoch": True}, "epoch: Input should be a valid integer"),
    ({"spec": {"model": None}}, "spec.model"),
    ({"objects": [{"name": ".metadata", "size": "10", "crc32": 1}]}, "objects.0.size"),
    ({"objects": [{"name": "../../x", "size": 10, "crc32": 1}]}, "'../../x' is not a name this project writes"),
    ({"objects": [{"name": "/etc/passwd", "size": 10, "crc32": 1}]}, "is not a name this project writes"),
    ({"objects": [{"name": "a\x1bb", "size": 10, "crc32": 1}]}, "is not a name this project writes"),
    ({"scaler": {"scale": "big"}}, "scaler.scale"),
    ({"step": None}, "step"),
])
def test_a_manifest_of_another_form_is_one_line_naming_the_field(change, match):
    with pytest.raises((UntrustedObject, ForeignObject), match=match) as refused:
        checkpoint.read_manifest(*manifest_at(json.dumps({**GOOD_MANIFEST, **change})))
    assert "\n" not in str(refused.value) and "/run/manifest.json" in str(refused.value)


def test_a_manifest_of_nested_brackets_or_too_many_bytes_is_one_line(monkeypatch):
    with pytest.raises(UntrustedObject, match="nested too deeply"):
        checkpoint.read_manifest(*manifest_at("[" * 200_000 + "]" * 200_000))
    with pytest.raises(UntrustedObject, match="not JSON"):
        checkpoint.read_manifest(*manifest_at(b"\xff\xfe"))
    monkeypatch.setattr(checkpoint, "MANIFEST_LIMIT", 1000)
    with pytest.raises(UntrustedObject, match="more than a checkpoint manifest holds"):
        checkpoint.read_manifest(*manifest_at(json.dumps(GOOD_MANIFEST) + " " * 1000))
