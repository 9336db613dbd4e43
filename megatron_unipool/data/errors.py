"""The data pipeline's one error type: a caller (the launcher, a tool) reports it in one line, where
any other exception is a bug and keeps its traceback."""
from __future__ import annotations


class DataError(ValueError):
    """The data a run reads cannot train its model: missing, damaged, empty or mismatched files, or
    input a tool cannot tokenise."""
