"""service/spec/bounded_yaml.py: YAML as a spec may be read: an alias bomb refused fast and small, self-reference,
nesting too deep and broken YAML each one SpecError, ordinary aliases still loaded (and a file over 1 MiB refused)."""

from __future__ import annotations

import time
import tracemalloc

import pytest
import yaml

from service.errors import SpecError
from service.spec import MAX_SPEC_VALUES, load_spec
from tests.support.user_errors import alias_bomb


def expanded_leaves(value, seen=None) -> int:
    """How many scalars `value` holds with every shared sub-list counted each time it appears (memoised)."""
    seen = {} if seen is None else seen
    if not isinstance(value, (list, dict)):
        return 1
    if id(value) not in seen:
        items = value.values() if isinstance(value, dict) else value
        seen[id(value)] = sum(expanded_leaves(item, seen) for item in items)
    return seen[id(value)]


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
