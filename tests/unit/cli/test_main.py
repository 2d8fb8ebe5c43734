"""service/cli/main.py: a spec `barlow` refuses (inf/nan, a credential, an endpoint with user info, a folder) is one
`barlow:` line naming the field, exit 2, no traceback and no secret, through the entry point in this process. The
real `barlow` executable, for a secret, an alias bomb and a FIFO: tests/e2e/test_spec_safety.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from service import cli
from tests.support.commands import barlow

ROOT = Path(__file__).resolve().parents[3]
DIGITS = str(ROOT / "specs" / "digits.yaml")
DIGITS_LINEAR = str(ROOT / "specs" / "digits-linear.yaml")
SECRET = "Sekr1tValue"  # what must never be printed


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
