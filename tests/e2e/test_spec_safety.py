"""The real `barlow` executable refusing a spec: one `barlow:` line first on standard error naming the problem,
exit status 2, no traceback, no secret anywhere in its output. The cases where the process itself is what is
tested: a secret in a YAML file (nothing the process prints may hold it), an alias bomb (refused under a 6 GiB
address-space limit, where expanding it would need tens of GB) and a FIFO as the spec (opened for reading, it would
block for ever). Every refusal through the entry point in process: tests/unit/cli/test_main.py (the checks
themselves: tests/unit/spec/test_sections.py and test_bounded_yaml.py, tests/unit/test_credentials.py)."""

from __future__ import annotations

import os
import resource
import subprocess
import time

import pytest

from service.spec import MAX_SPEC_VALUES
from tests.support.commands import BARLOW
from tests.support.runs import ROOT
from tests.support.user_errors import alias_bomb

SECRET = "Sekr1tValue"  # what must never be printed


def _limit_memory() -> None:  # `import torch` maps ~3.5 GB of address space; the bomb unchecked needs tens of GB
    limit = 6 << 30
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit if hard == resource.RLIM_INFINITY else min(limit, hard)))


CASES = {
    # case: (arguments, text the one `barlow:` message must contain)
    "secret in a YAML file": (["validate", "{tmp}/secret.yaml"],
                              "storage.options.client_kwargs.aws_secret_access_key: is a credential"),
    "alias bomb": (["validate", "{tmp}/bomb.yaml"], f"expands to more than {MAX_SPEC_VALUES} values (YAML aliases?)"),
    "FIFO": (["validate", "{tmp}/fifo.yaml"], "is not a regular file"),
}
DEADLINE_S = 240  # all of them, on 2 busy cores; a FIFO opened for reading would block until then


@pytest.fixture(scope="module")
def barlow_runs(tmp_path_factory) -> dict[str, tuple[int | None, str, str, float]]:
    """Every case started at once (each imports torch), then waited for one by one."""
    tmp = tmp_path_factory.mktemp("specs")
    (tmp / "secret.yaml").write_text(
        "data: {dataset: digits}\n"
        "storage:\n  options:\n    client_kwargs:\n      region_name: eu-west-1\n"
        f"      aws_secret_access_key: {SECRET}\n")
    (tmp / "bomb.yaml").write_text(alias_bomb())
    os.mkfifo(tmp / "fifo.yaml")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    started = {}
    for name, (args, _) in CASES.items():
        args = [arg.replace("{tmp}", str(tmp)) for arg in args]
        started[name] = (time.monotonic(), subprocess.Popen(
            [BARLOW, *args], cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, preexec_fn=_limit_memory if name == "alias bomb" else None))
    deadline = time.monotonic() + DEADLINE_S
    results = {}
    for name, (start, process) in started.items():
        try:
            out, err = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results[name] = (process.returncode, out, err, time.monotonic() - start)
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
            results[name] = (None, out, err + "\n(timed out: hung)", time.monotonic() - start)
    return results


@pytest.mark.parametrize("case", list(CASES))
def test_barlow_refuses_with_one_line_naming_the_field_and_no_secret(barlow_runs, case):
    returncode, out, err, _ = barlow_runs[case]
    messages = [line for line in (out + err).splitlines() if line.startswith("barlow:")]
    assert returncode == 2, (returncode, err[-2000:])
    assert len(messages) == 1 and messages[0] == err.splitlines()[0], err
    assert CASES[case][1] in err, err
    assert "Traceback" not in err and SECRET not in out + err
