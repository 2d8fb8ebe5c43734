"""service/spec/sections.py: defaults equal to the reference recipe (the argparse defaults of
facebookresearch/barlowtwins@8e8d284 `main.py` lines 25-46), frozen sections, invalid values refused, no inf/nan in
any float, no credential in storage.options and no user info in any location, never echoed."""

from __future__ import annotations

import typing

import pytest
import yaml
from pydantic import BaseModel

from service.errors import SpecError
from service.spec import (
    EvaluateSpec,
    TrainSpec,
    load_spec,
)

DIGITS = ["data.dataset=digits"]  # satisfies the data.path rule without a data set
SECRET = "Sekr1tValue"  # what must never be printed


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


def test_sections_are_frozen_and_forbid_extras():
    spec = load_spec(None, DIGITS)
    with pytest.raises(Exception):
        spec.optim.epochs = 5  # type: ignore[misc]
    with pytest.raises(Exception):
        TrainSpec.model_validate({"data": {"dataset": "digits"}, "extra": {}})


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


# ---- non-finite numbers: every float of both specs, tuples and optional fields included ----

def _float_fields(kind: type[BaseModel]) -> list[tuple[str, int | None, list]]:
    """(dotted field, tuple index or None, default as a list) for every float-holding field of a spec."""
    found = []
    for section, info in kind.model_fields.items():
        model = info.annotation
        for name, field in model.model_fields.items():
            annotation = field.annotation
            args = typing.get_args(annotation)
            if annotation is float or (float in args and typing.get_origin(annotation) is not tuple):
                found.append((f"{section}.{name}", None, None))
            elif typing.get_origin(annotation) is tuple and float in args:
                found += [(f"{section}.{name}", index, list(field.default)) for index in range(len(args))]
    return found


NON_FINITE = [".inf", "-.inf", ".nan", "nan", "inf"]
FLOATS = [(kind, *field) for kind in (TrainSpec, EvaluateSpec) for field in _float_fields(kind)]


@pytest.mark.parametrize("kind, field, index, default", FLOATS,
                         ids=[f"{kind.__name__}.{field}{'' if index is None else f'.{index}'}"
                              for kind, field, index, _ in FLOATS])
def test_every_float_field_refuses_non_finite_numbers(kind, field, index, default):
    base = ["data.dataset=digits"]
    for value in NON_FINITE:
        items = ", ".join(value if i == index else str(v) for i, v in enumerate(default)) if index is not None else ""
        override = f"{field}={value}" if index is None else f"{field}=[{items}]"
        with pytest.raises(SpecError) as caught:
            load_spec(None, [*base, override], kind=kind)
        where = field if index is None else f"{field}.{index}"
        assert f"  {where}: Input should be a finite number" in str(caught.value), (override, str(caught.value))


def test_float_fields_are_found():
    names = {f"{field}.{index}" if index is not None else field for _, field, index, _ in FLOATS}
    assert {"optim.lr_weights", "augment.blur.1", "augment.mean.2", "monitor.knn_temperature", "eval.lr_classifier",
            "data.train_crop_scale.0", "data.std.2"} <= names  # plain, tuple items, optional; both specs
    assert "loss.reference_world_size" not in names and "optim.epochs" not in names  # whole numbers are not floats


@pytest.mark.parametrize("options, where", [
    ({"key": SECRET}, "storage.options.key"),
    ({"client_kwargs": {"region_name": "x", "aws_secret_access_key": SECRET}},
     "storage.options.client_kwargs.aws_secret_access_key"),
    ({"config_kwargs": {"retries": {"max_attempts": 3}}, "s3_additional_kwargs": {"SSECustomerKey": SECRET}},
     "storage.options.s3_additional_kwargs.SSECustomerKey"),
    ({"headers": [{"Authorization": f"Bearer {SECRET}"}]}, "storage.options.headers.0.Authorization"),
    ({"token": {"type": "service_account", "private_key": SECRET}}, "storage.options.token"),
])
@pytest.mark.parametrize("kind", [TrainSpec, EvaluateSpec])
def test_credentials_in_storage_options_are_refused_at_any_depth_without_echo(tmp_path, kind, options, where):
    (tmp_path / "spec.yaml").write_text(
        yaml.safe_dump({"data": {"dataset": "digits"}, "storage": {"options": options}}))
    with pytest.raises(SpecError) as caught:
        load_spec(tmp_path / "spec.yaml", kind=kind)
    message = str(caught.value)
    assert f"  {where}: is a credential" in message and SECRET not in message
    assert "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY" in message and "storage.profile" in message
    assert "IRSA" in message and "credentials_secret" in message


def test_ordinary_storage_options_pass():
    options = {"endpoint_url": "http://minio:9000", "use_listings_cache": False,
               "client_kwargs": {"region_name": "eu-west-1"}, "config_kwargs": {"retries": {"max_attempts": 3}}}
    spec = load_spec(None, ["data.dataset=digits", f"storage.options={options}"])
    assert spec.storage.options == options


@pytest.mark.parametrize("kind, override, field", [
    (TrainSpec, "run.output=s3://AKIAEXAMPLE:hunter2@bucket/run", "run.output"),
    (TrainSpec, "data.path=https://user:hunter2@data.example/imagenet", "data.path"),
    (TrainSpec, "checkpoint.resume=s3://k:hunter2@b/r/checkpoints/step-000000004", "checkpoint.resume"),
    (EvaluateSpec, "backbone.weights=https://u:hunter2@host/resnet50.pth", "backbone.weights"),
    (EvaluateSpec, "data.subset_list=https://u:hunter2@host/1percent.txt", "data.subset_list"),
])
def test_every_location_refuses_user_info_without_echo(kind, override, field):
    with pytest.raises(SpecError) as refused:
        load_spec(None, ["data.dataset=digits", override], kind=kind)
    assert f"{field}: holds user info" in str(refused.value) and "hunter2" not in str(refused.value)
