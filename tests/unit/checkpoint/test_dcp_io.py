"""service/checkpoint/dcp_io.py: what a checkpoint's objects may hold, read without DCP: the restricted unpickler of
`.metadata`, the weights-only reading of non-tensor items, the metadata's size limit. Real checkpoints through the
same readers: tests/integration/test_checkpoint.py; planted ones through the CLI:
tests/integration/test_hostile_checkpoints.py."""

import io
import os
import pickle

import fsspec
import pytest
import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, MetadataIndex

from service.checkpoint import dcp_io
from service.checkpoint.dcp_io import CorruptCheckpoint, ForeignObject, load_item, read_metadata


class Planted:
    """What a hostile writer pickles: unpickling it calls os.system."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def metadata_with(relative_path: str = "__0_0.distcp") -> Metadata:
    index = MetadataIndex("optimizer.param_groups.0.lr")
    return Metadata(state_dict_metadata={"optimizer.param_groups.0.lr": BytesStorageMetadata()},
                    storage_data={index: _StorageInfo(relative_path=relative_path, offset=0, length=8)})


def test_metadata_of_dcp_classes_is_read():
    metadata = read_metadata(pickle.dumps(metadata_with()))
    assert isinstance(metadata, Metadata)
    assert [info.relative_path for info in metadata.storage_data.values()] == ["__0_0.distcp"]


def test_a_pickle_that_runs_code_is_refused_before_it_runs(tmp_path):
    marker = tmp_path / "planted"
    with pytest.raises(ForeignObject, match=r"\.metadata would load posix\.system") as refused:
        read_metadata(pickle.dumps(Planted(marker)))
    assert not marker.exists()
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])  # GLOBAL/REDUCE, NEWOBJ, STACK_GLOBAL
def test_every_pickle_protocol_goes_through_the_allow_list(tmp_path, protocol):
    marker = tmp_path / "planted"
    with pytest.raises(ForeignObject):
        read_metadata(pickle.dumps({"metadata": Planted(marker)}, protocol=protocol))
    assert not marker.exists()


def test_metadata_of_allowed_classes_still_names_only_plain_objects():
    """_StorageInfo's relative_path is where DCP reads an item from: a path out of the checkpoint is refused."""
    for path in ("../../elsewhere/__0_0.distcp", "/etc/passwd", "a\\b", "x/__0_0.distcp", ""):
        with pytest.raises(ForeignObject, match="not a name this project writes"):
            read_metadata(pickle.dumps(metadata_with(path)))


class ByName:
    """Pickles as `getattr(owner, name)`: how Python >= 3.12 pickles an Enum member."""

    def __init__(self, owner, name):
        self.owner, self.name = owner, name

    def __reduce__(self):
        return getattr, (self.owner, self.name)


def test_an_enum_member_pickled_by_name_is_read_and_nothing_else_through_getattr(tmp_path):
    """Metadata written under Python >= 3.12 (the image's) names `_MEM_FORMAT_ENCODING` members through getattr;
    getattr may name such a member and nothing else: from a function it would reach its module's globals."""
    from torch.distributed.checkpoint.metadata import _MEM_FORMAT_ENCODING, TensorProperties

    properties = read_metadata_of(TensorProperties(memory_format=torch.channels_last))
    assert properties.memory_format == torch.channels_last
    member = ByName(_MEM_FORMAT_ENCODING, "TORCH_CHANNELS_LAST")
    assert pickle.loads(pickle.dumps(member)) is _MEM_FORMAT_ENCODING.TORCH_CHANNELS_LAST  # the form is real
    metadata = metadata_with()
    metadata.planner_data = member
    assert read_metadata(pickle.dumps(metadata)).planner_data is _MEM_FORMAT_ENCODING.TORCH_CHANNELS_LAST
    for hostile in (ByName(_StorageInfo, "__init__"), ByName(_MEM_FORMAT_ENCODING, "__init__"),
                    ByName(_MEM_FORMAT_ENCODING, "_member_map_")):
        metadata.planner_data = hostile
        with pytest.raises(ForeignObject, match="getattr"):
            read_metadata(pickle.dumps(metadata))


def read_metadata_of(properties):
    metadata = metadata_with()
    metadata.planner_data = properties
    return read_metadata(pickle.dumps(metadata)).planner_data


@pytest.mark.parametrize("payload, match", [
    (pickle.dumps({"not": "metadata"}), "holds a dict, not DCP metadata"),
    (b"\x80\x05garbage", "is not DCP metadata"),
    (pickle.dumps(metadata_with())[:40], "is not DCP metadata"),
])
def test_metadata_that_is_not_dcp_metadata_is_corrupt(payload, match):
    with pytest.raises(CorruptCheckpoint, match=match):
        read_metadata(payload)


def test_non_tensor_items_load_as_data_and_refuse_code(tmp_path):
    buffer = io.BytesIO()
    torch.save({"lr": 0.2, "params": ["backbone.conv1.weight"], "filter": True}, buffer)
    buffer.seek(0)
    assert load_item(buffer, "optimizer.param_groups.0") == {"lr": 0.2, "params": ["backbone.conv1.weight"],
                                                             "filter": True}
    marker = tmp_path / "planted"
    buffer = io.BytesIO()
    torch.save(Planted(marker), buffer)
    buffer.seek(0)
    with pytest.raises(ForeignObject, match=r"item optimizer.param_groups.0.lr: .*posix.system"):
        load_item(buffer, "optimizer.param_groups.0.lr")
    assert not marker.exists()
    with pytest.raises(CorruptCheckpoint, match="item optimizer.param_groups.0.lr is not what torch.save writes"):
        load_item(io.BytesIO(b"PK\x03\x04 cut short"), "optimizer.param_groups.0.lr")


def test_metadata_larger_than_dcp_writes_is_not_read(monkeypatch):
    fs = fsspec.filesystem("memory")
    fs.pipe_file("/ckpt/.metadata", b"x" * 100)
    monkeypatch.setattr(dcp_io, "METADATA_LIMIT", 99)
    with pytest.raises(CorruptCheckpoint, match="more than DCP metadata holds"):
        dcp_io.read_verified(fs, "/ckpt/.metadata", {".metadata": {"size": 100, "crc32": 0}})
