"""The `barlow` command line in process (service.cli.main.main, the executable's entry point): validate, schema, and the
error of a device the machine lacks."""

import json

import pytest
import torch
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


def test_cuda_asked_for_on_a_machine_without_it_is_a_clear_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["train", DIGITS_SPEC, "--set", "run.device=cuda"]) == 2
    assert "no usable CUDA device" in capsys.readouterr().err
