"""service/storage/untrusted.py: lines split across chunks, and a line too long dropped whatever the chunks (the
hostile-storage suite: tests/integration/test_hostile_runs_and_data.py)."""

from __future__ import annotations

from service.storage.untrusted import split_lines


def test_lines_are_split_across_chunks_and_a_line_too_long_is_none_whatever_the_chunks():
    chunks = [b"ab\ncd", b"ef\n", b"x" * 10, b"y\nz"]
    assert list(split_lines(chunks, 5)) == [b"ab", b"cdef", None, b"z"]
    assert list(split_lines([b"abcde\n", b"abcdef\n\n"], 5)) == [b"abcde", None, b""]
    assert list(split_lines([b"abc", b"def"], 5)) == [None]  # no newline at all: dropped as it arrives
