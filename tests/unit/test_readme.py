"""The README is the front door: its spec reference and commands must match the code."""

import re
from pathlib import Path

from service.spec import EvaluateSpec, TrainSpec

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def documented_fields(title: str) -> set[str]:
    section = README.split(f"## {title}\n")[1].split("\n## ")[0]
    return set(re.findall(r"^\| `([a-z_]+\.[a-z_]+)` \|", section, flags=re.MULTILINE))


def test_spec_reference_documents_every_field():
    fields = {f"{section}.{name}" for section, info in TrainSpec.model_fields.items()
              for name in info.annotation.model_fields}
    assert documented_fields("Job spec reference") == fields


def test_evaluation_spec_reference_documents_every_own_field():
    shared = {"run", "checkpoint", "storage"}  # documented once, in the job spec reference
    fields = {f"{section}.{name}" for section, info in EvaluateSpec.model_fields.items() if section not in shared
              for name in info.annotation.model_fields}
    assert documented_fields("Evaluation spec reference") == fields


def test_readme_make_targets_exist():
    targets = set(re.findall(r"^([a-z-]+):", (ROOT / "Makefile").read_text(), flags=re.MULTILINE))
    used = set(re.findall(r"make ([a-z-]+)", README))
    assert used and used <= targets


def test_every_ready_spec_is_listed():
    for spec in (ROOT / "specs").glob("*.yaml"):
        assert f"`{spec.name}`" in README, spec.name


def test_every_run_option_of_the_kubernetes_scheduler_is_documented():
    from torchx.schedulers import get_scheduler_factories

    options = {name for name, _ in get_scheduler_factories()["kubernetes"](session_name="readme").run_opts()}
    section = README.split("Run options of the `kubernetes` scheduler")[1].split("\n\n", 2)[1]
    documented = {name for row in section.splitlines()[2:] for name in re.findall(r"`([a-z_]+)`", row.split("|")[1])}
    assert documented == options
