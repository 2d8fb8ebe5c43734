"""service/cli/training.py: `barlow train` and `barlow evaluate` record their command line with credentials
redacted."""

from __future__ import annotations

from pathlib import Path

from service import cli
from service.cli import training as cli_training
from service.errors import SpecError
from service.spec import load_spec

ROOT = Path(__file__).resolve().parents[3]
DIGITS = str(ROOT / "specs" / "digits.yaml")
DIGITS_LINEAR = str(ROOT / "specs" / "digits-linear.yaml")
SECRET = "Sekr1tValue"  # what must never be printed


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
