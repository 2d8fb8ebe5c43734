"""Which recipe changes a resume refuses (service/spec/recipe.py, as the checkpoint manager asks it), and the
spec's check of checkpoint.allow_changes. The manager against real storage: tests/integration/test_checkpoint.py."""

import pytest

from service.errors import SpecError
from service.spec import TrainSpec, load_spec, recipe
from tests.support.runs import DIGITS, ROOT
from tests.support.training import MODEL

# the resolved spec a checkpoint of tests.support.training.Training records
SAVED = TrainSpec.model_validate({"data": {"dataset": "digits"}, "model": MODEL.model_dump(),
                                  "run": {"output": "run"}}).model_dump(mode="json")


@pytest.mark.parametrize("change, allowed, refused", [
    ({"optim": {"epochs": 20}}, [], "optim.epochs"),
    ({"loss": {"lambd": 0.01}}, [], "loss.lambd"),
    ({"run": {"seed": 1}}, [], "run.seed"),
    ({"augment": {"blur": [0.5, 0.5]}}, [], "augment.blur"),
    ({"optim": {"batch_size": 64}}, [], "optim.batch_size"),  # even where the steps per epoch stay the same
    ({"data": {"image_size": 32}}, [], "data.image_size"),
    ({"run": {"precision": "bf16"}}, [], "run.precision"),
    ({"optim": {"epochs": 20, "lr_weights": 0.1}}, ["optim.epochs"], "optim.lr_weights"),
    ({"optim": {"epochs": 20, "lr_weights": 0.1}}, ["optim"], None),
    ({"run": {"log_every": 7}, "checkpoint": {"every_steps": 3}, "monitor": {"knn_every_epochs": 2}}, [], None),
    ({"data": {"workers": 7}, "ddp": {"static_graph": False}, "storage": {"retries": 1}}, [], None),
])
def test_resume_compares_recipes(change, allowed, refused):
    resumed = {**SAVED, **{section: {**SAVED[section], **fields} for section, fields in change.items()}}
    assert list(recipe.refused_changes(SAVED, resumed, allowed)) == ([refused] if refused else [])


def test_allow_changes_must_name_fields_of_the_spec():
    digits = ROOT / DIGITS
    assert load_spec(digits, ["checkpoint.allow_changes=[optim.epochs, augment]"])
    with pytest.raises(SpecError, match="names 'optim.epoch' \\(did you mean 'optim.epochs'\\?\\): not a field"):
        load_spec(digits, ["checkpoint.allow_changes=[optim.epoch]"])
