"""What the tests read from a run's log: the step a run says it resumed from.

Runs are deterministic, so a resume from too early a step (or none) trains the same steps again and ends with the
same outputs: comparing outputs cannot tell, and any progress line contains "step N". Only the resumed step can.
"""

from __future__ import annotations

import re

_RESUMED = re.compile(r"resumed from \S+: step (\d+)")


def resumed_step(log: str) -> int:
    """N of the run's `resumed from URL: step N (...)` line (the checkpoint manager logs it); fails if there is none."""
    match = _RESUMED.search(log)
    assert match, f"the run did not resume:\n{log[-3000:]}"
    return int(match.group(1))
