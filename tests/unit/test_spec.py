"""The job spec: shipped files, defaults equal to the reference recipe (the argparse defaults of
facebookresearch/barlowtwins@8e8d284 `main.py` lines 25-46 and `evaluate.py` lines 25-50), and helpful errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from service.errors import SpecError
from service.spec import (
    EvaluateSpec,
    TrainSpec,
    apply_overrides,
    json_schema,
    load_spec,
    read_spec_text,
    spec_digest,
    spec_to_yaml,
)

SPECS = Path(__file__).resolve().parents[2] / "specs"
SPEC_FILES = sorted(SPECS.glob("*.yaml")) + sorted(SPECS.glob("*.yml"))
DIGITS = ["data.dataset=digits"]  # satisfies the data.path rule without a data set


def test_specs_folder_is_not_empty():
    assert len(SPEC_FILES) >= 4
    names = {path.name for path in SPEC_FILES}
    assert {"digits.yaml", "cifar10.yaml", "imagenet-1000ep.yaml", "imagenet-seed-readme.yaml"} <= names


@pytest.mark.parametrize("path", SPEC_FILES, ids=[path.name for path in SPEC_FILES])
def test_every_shipped_spec_validates(path):
    raw = yaml.safe_load(path.read_text())
    kind = EvaluateSpec if "eval" in raw else TrainSpec  # evaluation specs have an eval section
    spec = load_spec(path, kind=kind)
    # Every key written in the file is a real field that survives validation unchanged.
    dumped = spec.model_dump(mode="json")
    for section, fields in raw.items():
        for name, value in fields.items():
            got = dumped[section][name]
            assert got == value or (isinstance(value, list) and list(got) == value), f"{section}.{name}"
    # And a spec written back to YAML loads to the same spec.
    assert kind.model_validate(yaml.safe_load(spec_to_yaml(spec))) == spec


def test_every_file_in_specs_is_yaml():
    # So that the parametrised test above really covers every file in the folder.
    others = [p.name for p in SPECS.iterdir() if p.is_file() and p.suffix not in (".yaml", ".yml")]
    assert others == []


def test_misspelt_field_names_it_and_suggests_the_right_one():
    with pytest.raises(SpecError) as caught:
        load_spec(None, DIGITS + ["optim.lr_weight=0.3"])
    message = str(caught.value)
    assert "optim.lr_weight" in message
    assert "lr_weights" in message
    # One problem, reported once.
    problem_lines = [line for line in message.splitlines() if "lr_weight" in line]
    assert len(problem_lines) == 1
    assert "1 problem" in message


def test_misspelt_field_in_a_file(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("data:\n  dataset: digits\noptim:\n  lr_weight: 0.3\n")
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    assert "optim.lr_weight" in str(caught.value)
    assert "lr_weights" in str(caught.value)
    assert str(path) in str(caught.value)


def test_wrong_type_names_the_field():
    with pytest.raises(SpecError) as caught:
        load_spec(None, DIGITS + ["optim.epochs=abc"])
    message = str(caught.value)
    assert "optim.epochs" in message
    assert "abc" in message


def test_unknown_section_is_rejected():
    with pytest.raises(SpecError, match="optimizer"):
        load_spec(None, DIGITS + ["optimizer.epochs=3"])


def test_defaults_are_the_reference_recipe():
    spec = load_spec(None, DIGITS)
    assert spec.optim.epochs == 1000
    assert spec.optim.batch_size == 2048
    assert spec.optim.lr_weights == 0.2
    assert spec.optim.lr_biases == 0.0048
    assert spec.optim.weight_decay == 1e-6
    assert spec.optim.warmup_epochs == 10
    assert spec.optim.momentum == 0.9
    assert spec.optim.eta == 0.001
    assert spec.optim.optimizer == "lars"
    assert spec.loss.lambd == 0.0051
    assert spec.loss.scale_loss == 1.0
    assert spec.loss.reference_world_size is None  # the true gradient unless asked
    assert spec.model.projector == "8192-8192-8192"
    assert spec.model.projector_sizes == [8192, 8192, 8192]
    assert spec.model.backbone == "resnet50"
    assert spec.model.stem == "imagenet"
    assert spec.data.image_size == 224
    assert spec.data.workers == "auto"  # the reference's 8 per GPU is a machine setting: sized from the machine
    assert spec.ddp.static_graph and spec.ddp.gradient_compression == "none"  # fp32 gradients, as the reference
    assert spec.run.precision == "fp16"
    assert spec.run.log_every == 100
    assert spec.augment.crop_scale == (0.08, 1.0)
    assert spec.augment.horizontal_flip == 0.5
    assert spec.augment.color_jitter == 0.8
    assert spec.augment.grayscale == 0.2
    assert spec.augment.blur == (1.0, 0.1)
    assert spec.augment.solarize == (0.0, 0.2)
    assert spec.augment.mean == (0.485, 0.456, 0.406)
    assert spec.augment.std == (0.229, 0.224, 0.225)
    assert spec.monitor.knn_k == 200 and spec.monitor.knn_temperature == 0.1  # the SSL benchmarks' weighted kNN


def test_data_path_required_for_imagefolder():
    with pytest.raises(SpecError) as caught:
        load_spec(None)
    assert "data.path" in str(caught.value)
    with pytest.raises(SpecError, match="data.path"):
        load_spec(None, ["data.dataset=cifar10"])
    assert load_spec(None, ["data.path=/somewhere"]).data.path == "/somewhere"


def test_batch_size_must_cover_the_workers_but_need_not_divide():
    # Uneven shares compute the same global-batch loss (tests/test_data.py, tests/distributed), so any world
    # size up to the batch size keeps the spec's global batch.
    assert load_spec(None, DIGITS + ["optim.batch_size=100"], world_size=3).optim.batch_size == 100
    assert load_spec(None, DIGITS, world_size=16).optim.batch_size == 2048
    with pytest.raises(SpecError) as caught:
        load_spec(None, DIGITS + ["optim.batch_size=8"], world_size=16)
    assert "optim.batch_size=8 is smaller than the 16 workers" in str(caught.value)


def test_overrides_parse_yaml_values():
    spec = load_spec(
        None,
        DIGITS + [
            "optim.lr_weights=0.3", "optim.epochs=7", "optim.warmup_epochs=1", "augment.blur=[0.0, 0.5]",
            "loss.reference_world_size=16", "run.channels_last=false", "model.projector=64-32",
        ],
    )
    assert spec.optim.lr_weights == 0.3
    assert spec.optim.epochs == 7
    assert spec.augment.blur == (0.0, 0.5)
    assert spec.loss.reference_world_size == 16
    assert spec.run.channels_last is False
    assert spec.model.projector_sizes == [64, 32]
    # Exponent notation (a string to PyYAML's YAML 1.1 resolver) still ends up as the number.
    spec = load_spec(None, DIGITS + ["optim.weight_decay=1.5e-6", "loss.lambd=5e-3"])
    assert spec.optim.weight_decay == pytest.approx(1.5e-6, rel=1e-12)
    assert spec.loss.lambd == pytest.approx(5e-3, rel=1e-12)


def test_apply_overrides_types_and_copy():
    original = {"optim": {"epochs": 5}}
    result = apply_overrides(original, ["optim.epochs=12", "optim.lr_weights=0.1", "augment.blur=[1, 0]",
                                        "run.output=runs/x", "loss.reference_world_size=null"])
    assert result["optim"]["epochs"] == 12 and isinstance(result["optim"]["epochs"], int)
    assert result["optim"]["lr_weights"] == pytest.approx(0.1)
    assert result["augment"]["blur"] == [1, 0]
    assert result["run"]["output"] == "runs/x"
    assert result["loss"]["reference_world_size"] is None
    assert original == {"optim": {"epochs": 5}}  # the input is not changed


def test_overrides_win_over_the_file():
    path = SPECS / "digits.yaml"
    assert load_spec(path).optim.epochs == 30  # the file says 30, the default is 1000
    assert load_spec(path, ["optim.epochs=3"]).optim.epochs == 3


@pytest.mark.parametrize("override", ["optim.epochs", "=3", "optim.epochs.value=3"])
def test_malformed_override_raises_spec_error(override):
    with pytest.raises(SpecError):
        load_spec(None, DIGITS + [override])


def test_yaml_list_file_raises_spec_error(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- data\n- optim\n")
    with pytest.raises(SpecError):
        load_spec(path)
    # Also with overrides, which must not be applied to a list.
    with pytest.raises(SpecError):
        load_spec(path, ["optim.epochs=3"])


def test_invalid_yaml_and_missing_file_raise_spec_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim: [unclosed\n")
    with pytest.raises(SpecError):
        load_spec(path)
    with pytest.raises(SpecError):
        load_spec(tmp_path / "missing.yaml")


def test_json_schema_describes_every_field_and_forbids_extras():
    schema = json_schema()
    definitions = schema["$defs"]
    assert schema.get("additionalProperties") is False
    # Every section of TrainSpec has its definition.
    section_names = {name for name, field in TrainSpec.model_fields.items()}
    assert set(schema["properties"]) == section_names
    referenced = set()
    for name, prop in schema["properties"].items():
        ref = prop.get("$ref") or next(item["$ref"] for item in prop.get("allOf", []) if "$ref" in item)
        referenced.add(ref.rsplit("/", 1)[-1])
    assert referenced <= set(definitions)
    assert len(definitions) >= 6
    for section, definition in definitions.items():
        assert definition.get("additionalProperties") is False, section
        properties = definition["properties"]
        assert properties, section
        for field, prop in properties.items():
            description = prop.get("description", "")
            assert isinstance(description, str) and description.strip(), f"{section}.{field} has no description"
        model_fields = TrainSpec.model_fields[
            next(name for name, p in schema["properties"].items()
                 if (p.get("$ref") or p["allOf"][0]["$ref"]).endswith("/" + section))
        ].annotation.model_fields
        assert set(properties) == set(model_fields), section


def test_sections_are_frozen_and_forbid_extras():
    spec = load_spec(None, DIGITS)
    with pytest.raises(Exception):
        spec.optim.epochs = 5  # type: ignore[misc]
    with pytest.raises(Exception):
        TrainSpec.model_validate({"data": {"dataset": "digits"}, "extra": {}})


def test_seed_readme_spec_is_the_old_form():
    spec = load_spec(SPECS / "imagenet-seed-readme.yaml")
    assert spec.loss.scale_loss == 0.024
    assert spec.optim.lr_weights == 0.2
    assert spec.optim.lr_biases == 0.2
    assert spec.optim.lr_biases == spec.optim.lr_weights
    assert spec.loss.reference_world_size == 16
    assert spec.optim.epochs == 1000
    assert spec.optim.batch_size == 2048
    assert spec.loss.lambd == 0.0051
    assert spec.model.projector == "8192-8192-8192"


def test_imagenet_1000ep_spec_is_the_reference_recipe():
    spec = load_spec(SPECS / "imagenet-1000ep.yaml")
    assert spec.optim.lr_weights == 0.2
    assert spec.optim.lr_biases == 0.0048
    assert spec.optim.weight_decay == 1e-6
    assert spec.loss.scale_loss == 1.0
    assert spec.data.dataset == "imagefolder"
    assert spec.model.backbone == "resnet50"


@pytest.mark.parametrize(
    "override",
    [
        "augment.crop_scale=[0.9, 0.1]", "augment.blur=[1.5, 0]", "optim.warmup_epochs=2000",
        "model.projector=8192--8192", "optim.momentum=1.0", "run.precision=fp8",
    ],
)
def test_invalid_values_raise_spec_error(override):
    with pytest.raises(SpecError) as caught:
        load_spec(None, DIGITS + [override])
    key = override.split("=")[0]
    assert key.split(".")[0] in str(caught.value)


def test_a_shipped_spec_is_read_only_while_it_matches_its_digest(monkeypatch):
    """The pods read the spec the job carries (env:BARLOW_SPEC) only if it is what was validated at submission."""
    text = spec_to_yaml(load_spec(SPECS / "digits.yaml"))
    monkeypatch.setenv("BARLOW_SPEC", text)
    monkeypatch.setenv("BARLOW_SPEC_SHA256", spec_digest(text))
    assert read_spec_text("env:BARLOW_SPEC") == text
    monkeypatch.setenv("BARLOW_SPEC", text.replace("epochs: 30", "epochs: 300"))
    with pytest.raises(SpecError, match="does not match BARLOW_SPEC_SHA256"):
        read_spec_text("env:BARLOW_SPEC")
