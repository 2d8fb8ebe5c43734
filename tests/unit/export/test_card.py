"""service/export/card.py: what storage hands the card (a run's location, an evaluation folder's name, a date) stays
inside its code span and its table cell, whatever it holds."""

from __future__ import annotations

import re

from service.export.card import Evaluation, ModelFacts, model_card, model_config, shown
from service.spec import TrainSpec

HOSTILE = "runs/x`|<script>alert(1)</script>\n## Licence\n| forged | row |"


def test_a_shown_string_cannot_leave_its_code_span_or_its_cell():
    text = shown(HOSTILE)
    assert text.startswith("`") and text.endswith("`") and text.count("`") == 2
    assert "\n" not in text and re.search(r"(?<!\\)\|", text) is None  # every pipe escaped


def test_the_card_keeps_hostile_locations_in_their_cells():
    spec = TrainSpec.model_validate({"data": {"dataset": "digits"}})
    facts = ModelFacts(spec=spec, source=HOSTILE, step=8, epoch=2, total_steps=8, created=HOSTILE,
                       spec_digest="0" * 64, train_images=1078,
                       evaluations=[Evaluation(HOSTILE, "linear", 81.25, 99.0, 10, 1078)])
    card = model_card(facts)
    assert [line for line in card.splitlines() if line.startswith("## ")] == [
        "## Training", "## Evaluation", "## Files", "## Loading", "## Licence"]  # no heading forged
    for line in card.splitlines():
        if line.startswith("| checkpoint"):  # a two-column row keeps its two cells
            assert len(re.findall(r"(?<!\\)\|", line)) == 3, line
    assert "<script>" in card and "`" + "runs/x'" in card  # shown, as code
    assert model_config(facts)["barlow_twins"]["checkpoint"]["url"] == HOSTILE  # JSON holds it as it is
