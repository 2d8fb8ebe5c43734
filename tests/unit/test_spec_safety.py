"""Specs that cannot poison a run or leak a secret: no inf/nan, no credentials (refused, never echoed), command lines
recorded redacted, no credential in a pod's arguments, YAML bounded (alias bombs, size, depth), and a spec path
that is a folder refused at once. The refusals go through the CLIs' entry points in this process; the real `barlow`
executable, for a secret, an alias bomb and a FIFO: tests/e2e/test_spec_safety.py."""

from __future__ import annotations

import time
import tracemalloc
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel, ValidationError

import components.barlowtwins as barlowtwins
from service import cli
from service.cli import training as cli_training
from service.credentials import is_credential_key, redact_arguments
from service.errors import SpecError
from service.spec import MAX_SPEC_VALUES, EvaluateSpec, StorageSpec, TrainSpec, load_spec
from tests.support.commands import barlow, torchx
from tests.support.user_errors import alias_bomb

ROOT = Path(__file__).resolve().parents[2]
DIGITS = str(ROOT / "specs" / "digits.yaml")
DIGITS_LINEAR = str(ROOT / "specs" / "digits-linear.yaml")
SECRET = "Sekr1tValue"  # what must never be printed


def expanded_leaves(value, seen=None) -> int:
    """How many scalars `value` holds with every shared sub-list counted each time it appears (memoised)."""
    seen = {} if seen is None else seen
    if not isinstance(value, (list, dict)):
        return 1
    if id(value) not in seen:
        items = value.values() if isinstance(value, dict) else value
        seen[id(value)] = sum(expanded_leaves(item, seen) for item in items)
    return seen[id(value)]


# ---- `barlow validate` refusing, through its entry point ----

CASES = {
    # case: (arguments, text the one `barlow:` message must contain)
    "inf override": (["validate", DIGITS, "--set", "optim.lr_weights=.inf"],
                     "optim.lr_weights: Input should be a finite number"),
    "nan in a tuple": (["validate", DIGITS, "--set", "augment.blur=[.nan, 0.1]"],
                       "augment.blur.0: Input should be a finite number"),
    "secret by --set, nested": (["validate", DIGITS, "--set",
                                 f"storage.options.client_kwargs.AWS_SESSION_TOKEN={SECRET}"],
                                "storage.options.client_kwargs.AWS_SESSION_TOKEN: is a credential"),
    "endpoint with user info": (["validate", DIGITS, "--set", f"storage.endpoint_url=https://minio:{SECRET}@minio.local:9000"],
                                "storage.endpoint_url: holds user info"),
    "folder": (["validate", "{tmp}"], "is a folder"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_barlow_refuses_with_one_line_naming_the_field_and_no_secret(tmp_path, case):
    result = barlow(*[arg.replace("{tmp}", str(tmp_path)) for arg in CASES[case][0]])
    returncode, out, err = result.returncode, result.stdout, result.stderr
    messages = [line for line in (out + err).splitlines() if line.startswith("barlow:")]
    assert returncode == 2, (returncode, err[-2000:])
    assert len(messages) == 1 and messages[0] == err.splitlines()[0], err
    assert CASES[case][1] in err, err
    assert "Traceback" not in err and SECRET not in out + err


def test_alias_bomb_would_expand_hugely_and_is_refused_fast_and_small(tmp_path):
    bomb = alias_bomb()
    assert len(bomb.encode()) < 1024
    parsed = yaml.safe_load(bomb)  # PyYAML shares aliased lists: cheap to build, 9**9 strings once walked
    assert expanded_leaves(parsed["a9"]) == 9 ** 9 > 1000 * MAX_SPEC_VALUES
    (tmp_path / "bomb.yaml").write_text(bomb)
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(SpecError, match="expands to more than 100000 values"):
            load_spec(tmp_path / "bomb.yaml")
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert elapsed < 2 and peak < 5 << 20, (elapsed, peak)
    # the same through an override (values are YAML)
    with pytest.raises(SpecError, match="override data.path expands to more than"):
        load_spec(None, ["data.path=" + "{" + ", ".join(bomb.strip().splitlines()) + "}"])


@pytest.mark.parametrize("args, named", [
    (["validate", DIGITS_LINEAR, "--set", "data.mean=[0.5, -.inf, 0.5]"], "data.mean.1: Input should be a finite"),
    (["validate", DIGITS, "--set", f"storage.options={{config_kwargs: {{}}, token: {SECRET}}}"],
     "storage.options.token: is a credential"),
    (["train", "{tmp}"], "is a folder"),
    (["evaluate", "{tmp}"], "is a folder"),
])
def test_more_refusals_through_the_cli(tmp_path, capsys, args, named):
    assert cli.main([arg.replace("{tmp}", str(tmp_path)) for arg in args]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("barlow: ") and captured.err.count("barlow:") == 1 and named in captured.err
    assert SECRET not in captured.out + captured.err


@pytest.mark.parametrize("text, problem", [
    ("a: &a [*a]\n", "expands to more than"),  # refers to itself: endless
    ("[" * 2000 + "]" * 2000, "nests too deeply"),
    ("data: {dataset: digits\n", "is not valid YAML"),
])
def test_unbounded_or_broken_yaml_is_one_spec_error(tmp_path, text, problem):
    (tmp_path / "spec.yaml").write_text(text)
    with pytest.raises(SpecError, match=problem):
        load_spec(tmp_path / "spec.yaml")


def test_ordinary_aliases_still_load_and_big_files_are_refused(tmp_path):
    (tmp_path / "spec.yaml").write_text(
        "data: {dataset: digits}\naugment:\n  blur: &none [0.0, 0.0]\n  solarize: *none\n")
    assert load_spec(tmp_path / "spec.yaml").augment.solarize == (0.0, 0.0)
    (tmp_path / "big.yaml").write_text("data: {dataset: digits}\n" + "# padding\n" * 120_000)
    with pytest.raises(SpecError, match="larger than 1 MiB"):
        load_spec(tmp_path / "big.yaml")


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


# ---- credentials ----

CREDENTIAL_KEYS = ["key", "secret", "token", "password", "passwd", "session_token", "security_token", "access_key",
                   "secret_key", "aws_access_key_id", "aws_secret_access_key", "aws_session_token", "credentials",
                   "private_key", "sas_token", "account_key", "client_secret", "AWS_SECRET_ACCESS_KEY",
                   "SecretAccessKey", "secretaccesskey", "Session-Token", "SSECustomerKey", "Authorization", "api_key"]
ORDINARY_KEYS = ["endpoint_url", "region_name", "use_listings_cache", "retries", "max_attempts", "anon", "profile",
                 "signature_version", "addressing_style", "requester_pays", "default_block_size", "SSEKMSKeyId",
                 "client_kwargs", "config_kwargs", "s3_additional_kwargs", "account_name", "project", "monkey"]


def test_credential_key_predicate():
    assert [key for key in CREDENTIAL_KEYS if not is_credential_key(key)] == []
    assert [key for key in ORDINARY_KEYS if is_credential_key(key)] == []


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


# ---- command lines recorded redacted ----

@pytest.mark.parametrize("args, expected", [
    (["--set", f"storage.options.secret={SECRET}"], ["--set", "storage.options.secret=***"]),
    ([f"--set=storage.options.client_kwargs.aws_secret_access_key={SECRET}"],
     ["--set=storage.options.client_kwargs.aws_secret_access_key=***"]),
    ([f"storage.options.key={SECRET}"], ["storage.options.key=***"]),
    ([f"storage.options.credentials.file={SECRET}"], ["storage.options.credentials.file=***"]),  # any dotted part
    ([f"AWS_SECRET_ACCESS_KEY={SECRET}", f"--env=AWS_SESSION_TOKEN={SECRET}"],
     ["AWS_SECRET_ACCESS_KEY=***", "--env=AWS_SESSION_TOKEN=***"]),
    (["--set", f"storage.options={{token: {SECRET}}}"], ["--set", "storage.options=***"]),
    (["--set", f"storage.endpoint_url=https://minio:{SECRET}@minio.local:9000/x"],
     ["--set", "storage.endpoint_url=https://***@minio.local:9000/x"]),
    ([f"https://u:p@{SECRET}@host/path@x"], ["https://***@host/path@x"]),  # user info up to the host's @
    (["train", "specs/digits.yaml", "--set", "optim.epochs=3", "--set", "storage.endpoint_url=http://minio:9000",
      "--set", "storage.options.client_kwargs.region_name=eu-west-1", "--set", "run.output=s3://bucket/runs/x"],
     ["train", "specs/digits.yaml", "--set", "optim.epochs=3", "--set", "storage.endpoint_url=http://minio:9000",
      "--set", "storage.options.client_kwargs.region_name=eu-west-1", "--set", "run.output=s3://bucket/runs/x"]),
])
def test_redact_arguments(args, expected):
    assert redact_arguments(args) == expected


def test_train_and_evaluate_record_the_command_redacted(monkeypatch, capsys):
    import service.evaluation.evaluate
    import service.train.trainer

    recorded = {}

    def recording(what):
        def run(spec, command, **_):  # what the run would write as stats.txt's first line; then stop
            recorded[what] = command
            raise SpecError("stopped by the test")
        return run

    monkeypatch.setattr(service.train.trainer, "train", recording("train"))
    monkeypatch.setattr(service.evaluation.evaluate, "evaluate", recording("evaluate"))
    # The spec refuses these values itself; the redaction is the second line, so the spec is loaded without them.
    monkeypatch.setattr(cli_training, "load_spec", lambda path, overrides, **kwargs: load_spec(path, [], **kwargs))
    assert cli.main(["train", DIGITS, "--set", f"run.output=memory://user:{SECRET}@bucket/run"]) == 2
    assert cli.main(["evaluate", DIGITS_LINEAR, "--set", f"backbone.weights=https://user:{SECRET}@host/w.pth"]) == 2
    assert recorded["train"] == f"barlow train {DIGITS} --set 'run.output=memory://***@bucket/run'"
    assert recorded["evaluate"] == f"barlow evaluate {DIGITS_LINEAR} --set 'backbone.weights=https://***@host/w.pth'"


# ---- the TorchX component: no credential in a pod's arguments ----

@pytest.mark.parametrize("component", [barlowtwins.train, barlowtwins.evaluate])
@pytest.mark.parametrize("override, named", [
    (f"storage.options.secret={SECRET}", "'secret'"),
    (f"storage.options.client_kwargs.aws_secret_access_key={SECRET}", "'aws_secret_access_key'"),
    (f"storage.options={{token: {SECRET}}}", "'token'"),
    (f"storage.endpoint_url=https://minio:{SECRET}@minio:9000", "user info"),
])
def test_component_refuses_a_credential_override(component, override, named):
    with pytest.raises(ValueError) as caught:
        component("specs/digits.yaml", "optim.epochs=2", override)
    message = str(caught.value)
    assert named in message and override.partition("=")[0] in message and SECRET not in message
    assert "credentials_secret" in message


def test_component_keeps_ordinary_overrides():
    app = barlowtwins.train("specs/digits.yaml", "optim.epochs=2", "storage.endpoint_url=http://minio:9000",
                            "storage.options.client_kwargs.region_name=eu-west-1")
    shipped = yaml.safe_load(app.roles[0].env["BARLOW_SPEC"])
    assert shipped["optim"]["epochs"] == 2 and shipped["storage"]["endpoint_url"] == "http://minio:9000"
    assert shipped["storage"]["options"] == {"client_kwargs": {"region_name": "eu-west-1"}}


def test_torchx_run_and_barlow_submit_refuse_a_secret_override():
    result = torchx("run", "--dryrun", "--workspace", "", "-s", "local_cwd", "components/barlowtwins.py:train",
                    "--spec", "specs/digits.yaml", f"storage.options.secret={SECRET}")
    assert result.returncode != 0 and "sets a credential ('secret')" in result.stderr
    assert SECRET not in result.stdout + result.stderr
    result = barlow("submit", DIGITS, "--scheduler", "local_cwd", "--dryrun",
                    "--set", f"storage.options.client_kwargs.aws_secret_access_key={SECRET}")
    assert result.returncode == 2
    assert "barlow: override storage.options.client_kwargs.aws_secret_access_key=... sets a credential" in result.stderr
    assert SECRET not in result.stdout + result.stderr


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
