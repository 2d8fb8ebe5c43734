"""The README is the front door and docs/ holds the guides and references behind it: the spec references, commands
and options they document must match the code, and every page is on the README's map with links that resolve."""

import re
from pathlib import Path

import pytest

from service.spec import EvaluateSpec, TrainSpec

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
PAGES = sorted((ROOT / "docs").glob("*.md"))


def page(name: str) -> str:
    return (ROOT / "docs" / name).read_text()


def documented_fields(text: str) -> set[str]:
    return set(re.findall(r"^\| `([a-z_]+\.[a-z_]+)` \|", text, flags=re.MULTILINE))


def test_spec_reference_documents_every_field():
    fields = {f"{section}.{name}" for section, info in TrainSpec.model_fields.items()
              for name in info.annotation.model_fields}
    assert documented_fields(page("job-spec.md")) == fields


def test_evaluation_spec_reference_documents_every_own_field():
    shared = {"run", "checkpoint", "storage"}  # documented once, in the job spec reference
    fields = {f"{section}.{name}" for section, info in EvaluateSpec.model_fields.items() if section not in shared
              for name in info.annotation.model_fields}
    assert documented_fields(page("evaluation-spec.md")) == fields


def test_documented_make_targets_exist():
    targets = set(re.findall(r"^([a-z-]+):", (ROOT / "Makefile").read_text(), flags=re.MULTILINE))
    for text in [README] + [p.read_text() for p in PAGES]:
        assert set(re.findall(r"make ([a-z-]+)", text)) <= targets
    assert {"demo", "test"} <= set(re.findall(r"make ([a-z-]+)", README))


def test_every_ready_spec_is_listed():
    listing = page("running-your-own-spec.md")
    for spec in (ROOT / "specs").glob("*.yaml"):
        assert f"`{spec.name}`" in listing, spec.name


@pytest.mark.parametrize("scheduler", ["kubernetes", "jobset"])
def test_every_run_option_of_the_cluster_schedulers_is_documented(scheduler):
    from torchx.schedulers import get_scheduler_factories

    options = {name for name, _ in get_scheduler_factories()[scheduler](session_name="readme").run_opts()}
    section = page("kubernetes.md").split("Run options of the `kubernetes` and `jobset` schedulers")[1]
    section = section.split("\n\n", 2)[1]
    documented = {name for row in section.splitlines()[2:] for name in re.findall(r"`([a-z_]+)`", row.split("|")[1])}
    assert documented == options


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def links(text: str) -> list[str]:
    prose = re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)
    return re.findall(r"\]\(([^)\s]+)\)", prose)


def test_every_page_in_docs_is_on_the_readme_map():
    linked = {target.split("#")[0] for target in links(README)}
    assert {f"docs/{p.name}" for p in PAGES} <= linked


def test_relative_links_and_their_anchors_resolve():
    for source in [ROOT / "README.md"] + PAGES:
        for target in links(source.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, fragment = target.partition("#")
            file = (source.parent / path).resolve() if path else source
            assert file.exists(), f"{source.name}: {target}"
            if fragment:
                headings = re.findall(r"^#+ (.+)$", file.read_text(), flags=re.MULTILINE)
                assert fragment in {anchor(h) for h in headings}, f"{source.name}: {target}"
