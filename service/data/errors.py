"""The data's errors: a data set that cannot be used as the spec says, and one sample that cannot be read."""

from __future__ import annotations

from service.errors import DataError


class SampleError(DataError):
    """One sample cannot be read or decoded: `index` (in its data set) and `name` say which."""

    def __init__(self, message: str, index: int, name: str):
        super().__init__(message)
        self.index = index
        self.name = name

    def __reduce__(self):  # raised in a loader process, re-raised in the training worker
        return type(self), (str(self), self.index, self.name)
