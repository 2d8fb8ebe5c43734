"""service/spec/loading.py: the shipped files in specs/ load and round-trip; overrides; misspelt fields, wrong types,
malformed overrides and unreadable files give one helpful error that echoes no secret; the JSON Schema; a shipped
spec is read only while it matches its digest."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from service.errors import SpecError
from service.spec import (
    EvaluateSpec,
    StorageSpec,
    TrainSpec,
    apply_overrides,
    json_schema,
    load_spec,
    read_spec_text,
    spec_digest,
    spec_to_yaml,
)

SPECS = Path(__file__).resolve().parents[3] / "specs"
SPEC_FILES = sorted(SPECS.glob("*.yaml")) + sorted(SPECS.glob("*.yml"))
DIGITS = ["data.dataset=digits"]  # satisfies the data.path rule without a data set
SECRET = "Sekr1tValue"  # what must never be printed


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


def test_a_shipped_spec_is_read_only_while_it_matches_its_digest(monkeypatch):
    """The pods read the spec the job carries (env:BARLOW_SPEC) only if it is what was validated at submission."""
    text = spec_to_yaml(load_spec(SPECS / "digits.yaml"))
    monkeypatch.setenv("BARLOW_SPEC", text)
    monkeypatch.setenv("BARLOW_SPEC_SHA256", spec_digest(text))
    assert read_spec_text("env:BARLOW_SPEC") == text
    monkeypatch.setenv("BARLOW_SPEC", text.replace("epochs: 30", "epochs: 300"))
    with pytest.raises(SpecError, match="does not match BARLOW_SPEC_SHA256"):
        read_spec_text("env:BARLOW_SPEC")


def test_no_error_path_echoes_a_secret():
    # a wrong type under storage, whose "(got ...)" would print the input
    with pytest.raises(SpecError) as caught:
        load_spec(None, ["data.dataset=digits", f"storage.endpoint_url={{password: {SECRET}}}"])
    assert "storage.endpoint_url: Input should be a valid string (got {'password': '***'})" in str(caught.value)
    # the endpoint's user info, through load_spec and through a StorageSpec built directly (barlow checkpoints ls)
    with pytest.raises(SpecError) as caught:
        load_spec(None, ["data.dataset=digits", f"storage.endpoint_url=https://user:{SECRET}@minio:9000"])
    assert "storage.endpoint_url: holds user info" in str(caught.value) and SECRET not in str(caught.value)
    with pytest.raises(ValidationError) as direct:
        StorageSpec(endpoint_url=f"https://user:{SECRET}@minio:9000")
    assert SECRET not in str(direct.value)
    # and YAML syntax errors do not quote the line that holds the mistake
    with pytest.raises(SpecError) as caught:
        load_spec(None, [f"storage.options={{aws_secret_access_key: {SECRET}"])
    assert SECRET not in str(caught.value)
