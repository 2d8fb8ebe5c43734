"""The README is the front door: its spec reference and commands must match the code."""

import re
from pathlib import Path

from service.spec import TrainSpec

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_spec_reference_documents_every_field():
    fields = {f"{section}.{name}" for section, info in TrainSpec.model_fields.items()
              for name in info.annotation.model_fields}
    documented = set(re.findall(r"^\| `([a-z_]+\.[a-z_]+)` \|", README, flags=re.MULTILINE))
    assert fields <= documented
    assert not {entry for entry in documented if entry.split(".")[0] in TrainSpec.model_fields} - fields


def test_readme_make_targets_exist():
    targets = set(re.findall(r"^([a-z-]+):", (ROOT / "Makefile").read_text(), flags=re.MULTILINE))
    used = set(re.findall(r"make ([a-z-]+)", README))
    assert used and used <= targets


def test_every_ready_spec_is_listed():
    for spec in (ROOT / "specs").glob("*.yaml"):
        assert f"`{spec.name}`" in README, spec.name
