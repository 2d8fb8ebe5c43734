"""service/cli/specs.py through `barlow`'s entry point in this process (service.cli.main.main): `validate` prints
the resolved spec, `schema` writes the specs' JSON Schema."""

import json

import yaml

from service.cli.main import main
from service.spec import load_spec
from tests.support.runs import DIGITS, ROOT

DIGITS_SPEC = str(ROOT / DIGITS)


def test_validate_prints_the_resolved_spec(capsys):
    assert main(["validate", DIGITS_SPEC, "--set", "optim.lr_weights=0.3"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["optim"]["lr_weights"] == 0.3
    assert printed == load_spec(DIGITS_SPEC, ["optim.lr_weights=0.3"]).model_dump(mode="json")


def test_schema_command_writes_the_json_schema(tmp_path):
    assert main(["schema", "-o", str(tmp_path / "schema.json")]) == 0
    schema = json.loads((tmp_path / "schema.json").read_text())
    assert {"data", "augment", "model", "loss", "optim", "run"} <= set(schema["properties"])
