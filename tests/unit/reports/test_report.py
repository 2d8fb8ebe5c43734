"""service/reports/report.py: an event file's record framing: a record larger than an event is refused, a cut tail is
not (the hostile-storage suite: tests/integration/test_hostile_runs_and_data.py)."""

from __future__ import annotations

import struct

import pytest

from service.reports.report import MAX_RECORD_BYTES, check_records
from service.storage.untrusted import UntrustedObject


def event_record(length: int, data: bytes = b"") -> bytes:
    return struct.pack("<Q", length) + b"\0" * 4 + data + b"\0" * 4


def test_an_event_file_declaring_a_record_larger_than_an_event_is_refused_and_a_cut_tail_is_not(tmp_path):
    path = tmp_path / "events.out.tfevents.1.h.1.0"
    path.write_bytes(event_record(3, b"abc") + event_record(100, b"cut sho"))  # a file still being written
    check_records(path, "the file")
    path.write_bytes(event_record(3, b"abc") + event_record(MAX_RECORD_BYTES + 1))
    with pytest.raises(UntrustedObject, match=f"the file: a record of {MAX_RECORD_BYTES + 1:,} bytes at byte 19"):
        check_records(path, "the file")
