"""service/spec/recipe.py: which recipe changes a resume refuses, field by field, as the checkpoint manager asks it.
The manager against real storage: tests/integration/test_checkpoint.py."""

import pytest

from service.spec import TrainSpec, recipe
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
